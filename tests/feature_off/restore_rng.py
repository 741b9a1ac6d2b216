"""RNG state restore off: a resumed run restores parameters and optimizer state but keeps its fresh RNG
streams (dropout's ``rest`` and the loss terms' ``key``), so its dropout masks differ from an
uninterrupted run's."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_killed_run_resumes_only_the_remaining_steps_from_its_saved_state",
)


def disable() -> None:
  import dataclasses
  from kdlab.train import checkpoint
  restore = checkpoint.Checkpointer.restore

  def restore_but_fresh_rngs(self, like, step=None):
    state, data_state = restore(self, like, step)
    return dataclasses.replace(state, rest=like.rest, key=like.key), data_state

  checkpoint.Checkpointer.restore = restore_but_fresh_rngs


pytest_configure = plugin(__name__, disable)
