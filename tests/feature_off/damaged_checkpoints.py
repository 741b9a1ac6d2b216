"""Damaged-checkpoint skipping off: a resume restores the latest checkpoint whatever its state, so a
damaged one ends the run in an orbax traceback instead of being moved aside for the one before."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_faults.py::test_damaged_checkpoints_are_moved_aside_and_the_newest_that_loads_resumes",
    "tests/test_faults.py::test_no_checkpoint_that_loads_is_one_line_error_and_changes_nothing",
)


def disable() -> None:
  from kdlab.train import checkpoint

  def restore_newest(self, like, at_most=None, warn=None):
    del warn
    steps = [s for s in self.manager.all_steps() if at_most is None or s <= at_most]
    if not steps:
      return None
    state, data_state = self.restore(like, max(steps))
    return state, data_state, max(steps)

  checkpoint.Checkpointer.restore_newest = restore_newest


pytest_configure = plugin(__name__, disable)
