"""Process-local data off: every process reads the whole global batch instead of its rows of it."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_multihost.py::test_two_processes_train_as_one_process_of_eight_devices[classification]",
    "tests/test_data.py::test_a_share_of_the_rows_is_read_and_augmented_as_the_whole_batch_has_them",
)


def disable() -> None:
  from kdlab import mesh
  from kdlab.data import augment, pipeline

  mesh.process_rows = lambda mesh_, batch_size: (0, batch_size)
  rows_of = pipeline.EpochBatches.__init__

  def whole_batches(self, num_examples, batch_size, seed, rows=None):
    rows_of(self, num_examples, batch_size, seed, None)

  pipeline.EpochBatches.__init__ = whole_batches
  augment_rows = augment.augment_rows
  pipeline.augment_rows = lambda aug, images, rng, batch_size, first_row: augment_rows(aug, images, rng, batch_size, 0)


pytest_configure = plugin(__name__, disable)
