"""Asynchronous checkpoints off: every save blocks until it is on disk."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_fsdp.py::test_save_is_asynchronous_and_waited_for",)


def disable() -> None:
  from kdlab.train import checkpoint
  save = checkpoint.Checkpointer.save

  def blocking_save(self, step, state, data_state):
    save(self, step, state, data_state)
    self.manager.wait_until_finished()

  checkpoint.Checkpointer.save = blocking_save


pytest_configure = plugin(__name__, disable)
