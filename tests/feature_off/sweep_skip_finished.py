"""Sweep skip off: a rerun does not skip the finished runs; it hands them to ``train`` again."""

import sys

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_sweep.py::test_a_failing_run_does_not_stop_the_sweep_which_exits_1_and_a_rerun_retries_only_it",
)


def disable() -> None:
  from kdlab import sweep
  finished = sweep.finished

  def finished_unless_running(workdir, run):
    # Only where the sweep decides what to train; results.md still counts the finished runs.
    if sys._getframe(1).f_code.co_name in ("run_sweep", "_run_sequential"):
      return False
    return finished(workdir, run)

  sweep.finished = finished_unless_running


pytest_configure = plugin(__name__, disable)
