"""Sweep failures off: the first failing run stops the sweep (the runs after it never start)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_sweep.py::test_a_failing_run_does_not_stop_the_sweep_which_exits_1_and_a_rerun_retries_only_it",
)


def disable() -> None:
  from kdlab import sweep
  run_sequential = sweep._run_sequential

  def stop_at_first_failure(base, sw, workdir, todo, use_wandb, say, worker=False):
    failed = []
    for item in todo:
      failed += run_sequential(base, sw, workdir, [item], use_wandb, say, worker)
      if failed:
        break
    return failed

  sweep._run_sequential = stop_at_first_failure


pytest_configure = plugin(__name__, disable)
