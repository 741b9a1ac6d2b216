"""Atomic checkpoints off: orbax writes each step straight into ``checkpoints/<step>/`` and counts any
such folder as complete, so a save killed part-way leaves a half-written checkpoint as the latest."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_save_killed_mid_write_leaves_the_previous_checkpoint_and_resumes_from_it",
)


def disable() -> None:
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity
  from kdlab.train import checkpoint

  class InPlacePath(atomicity.CommitFileTemporaryPath):
    """The final folder is the temporary one, and it is complete as soon as it exists."""

    @classmethod
    async def validate(cls, temporary_path):
      raise atomicity.ValidationError(f"{temporary_path} is never temporary")

    @classmethod
    async def validate_final(cls, final_path):
      del final_path

  def __init__(self, directory, *, max_to_keep=2, async_save=True):
    del async_save
    import pathlib
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                             temporary_path_class=InPlacePath))

  checkpoint.Checkpointer.__init__ = __init__


pytest_configure = plugin(__name__, disable)
