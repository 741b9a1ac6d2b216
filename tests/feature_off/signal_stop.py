"""Signal handling off: SIGINT and SIGTERM keep Python's defaults, during training too. SIGTERM kills the
run at once without a checkpoint; SIGINT raises KeyboardInterrupt wherever the run is (mid-save
included) and ends in a traceback."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_interrupt.py::test_sigterm_saves_every_vmapped_seed_at_the_step_in_flight_and_the_same_command_resumes_there",
    "tests/test_interrupt.py::test_sigint_during_a_save_waits_for_it_then_saves_the_step_in_flight",
    "tests/test_interrupt.py::test_second_sigint_exits_at_once_and_leaves_the_previous_checkpoint_latest",
    "tests/test_interrupt.py::test_born_again_chain_stops_within_its_generation",
    "tests/test_interrupt.py::test_signal_during_start_up_stops_at_once_and_writes_nothing",
    "tests/test_interrupt.py::test_interrupted_sweep_saves_its_run_and_starts_no_other",
)


def disable() -> None:
  import contextlib
  from kdlab.train import stopping
  stopping.Deferred.__enter__ = lambda self: self
  stopping.Deferred.__exit__ = lambda self, *exc_info: None
  stopping.raising = contextlib.nullcontext


pytest_configure = plugin(__name__, disable)
