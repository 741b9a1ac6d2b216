"""TFDS "not prepared" check off: TFDS's own exception escapes instead of the one-line ``kdlab: error``."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_data.py::test_tfds_source_not_prepared_is_a_one_line_error_and_writes_nothing",
)


def disable() -> None:
  from kdlab.data import sources

  def load_tfds_unchecked(name, split, data_dir):
    import tensorflow_datasets as tfds
    dataset = name.removeprefix("tfds:")
    records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    info = tfds.builder(dataset, data_dir=data_dir).info
    return sources.Source(name, split, int(info.features["label"].num_classes),
                          tuple(int(d) for d in info.features["image"].shape), sources._TfdsRecords(records))

  sources._load_tfds = load_tfds_unchecked


pytest_configure = plugin(__name__, disable)
