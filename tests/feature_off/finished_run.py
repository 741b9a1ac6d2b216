"""Finished-run detection off: rerunning a finished run no longer returns its saved summary untouched; it
restores the final checkpoint, evaluates again and rewrites config.json, metrics.jsonl and summary.json."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_finished_run_rerun_trains_no_step_and_changes_no_file",
)


def disable() -> None:
  from kdlab.train import loop
  loop._finished_summaries = lambda workdirs, total_steps: None


pytest_configure = plugin(__name__, disable)
