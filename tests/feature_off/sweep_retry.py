"""Sweep retry off: a rerun skips the runs that failed before (remembered in ``WORKDIR/.failed``)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_sweep.py::test_a_failing_run_does_not_stop_the_sweep_which_exits_1_and_a_rerun_retries_only_it",
)


def disable() -> None:
  from kdlab import sweep
  run_sequential = sweep._run_sequential

  def skip_earlier_failures(base, sw, workdir, todo, use_wandb, say, worker=False):
    record = workdir / ".failed"
    earlier = set(record.read_text().split()) if record.exists() else set()
    failed = run_sequential(base, sw, workdir, [(i, r) for i, r in todo if r.name not in earlier], use_wandb, say,
                            worker)
    record.write_text("\n".join(sorted(earlier | set(failed))))
    return failed

  sweep._run_sequential = skip_earlier_failures


pytest_configure = plugin(__name__, disable)
