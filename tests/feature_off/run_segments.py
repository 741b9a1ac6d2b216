"""Run segments off: ``summary.json``'s wall time and speed cover only the process that finished the run,
not the ones it resumed from."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_interrupt.py::test_sigterm_saves_every_vmapped_seed_at_the_step_in_flight_and_the_same_command_resumes_there",
    "tests/test_faults.py::test_damaged_checkpoints_are_moved_aside_and_the_newest_that_loads_resumes",
)


def disable() -> None:
  from kdlab.train import logging

  def totals(self):
    s = self.current
    return {"wall_time_s": s["wall_time_s"],
            "steps_per_s": s["steps_timed"] / s["time_in_steps"] if s["time_in_steps"] else None}

  logging.Segments.totals = totals


pytest_configure = plugin(__name__, disable)
