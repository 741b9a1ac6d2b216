"""EMA resume off: a resumed run's EMA teacher restarts from the fresh init instead of the checkpoint."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_procedures.py::test_ema_teacher_resumes_from_its_checkpoint",)


def disable() -> None:
  import dataclasses
  from kdlab.train import checkpoint
  restore = checkpoint.Checkpointer.restore

  def restore_without_ema(self, like, step=None):
    state, data = restore(self, like, step)
    return dataclasses.replace(state, ema=like.ema), data

  checkpoint.Checkpointer.restore = restore_without_ema


pytest_configure = plugin(__name__, disable)
