"""Restore off: a restarted run never finds its checkpoints and trains again from step 0.

``tests/test_lm_train.py::test_killed_kd_run_resumes_only_the_remaining_steps_to_the_same_result`` fails
too, but its module fixture trains two language models; the digits tests below are the quick guards.
"""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_finished_run_rerun_trains_no_step_and_changes_no_file",
    "tests/test_train.py::test_killed_run_resumes_only_the_remaining_steps_from_its_saved_state",
)


def disable() -> None:
  from kdlab.train import checkpoint
  checkpoint.Checkpointer.latest_step = lambda self: None


pytest_configure = plugin(__name__, disable)
