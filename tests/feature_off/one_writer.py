"""One writer off: every process of a multi-process run writes the run's files (and its W&B run)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_multihost.py::test_two_processes_train_as_one_process_of_eight_devices[lm]",
)


def disable() -> None:
  from kdlab import distributed
  distributed.is_writer = lambda: True


pytest_configure = plugin(__name__, disable)
