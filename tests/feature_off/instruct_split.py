"""Content-hash split off: the last records of the files are the validation split (by position)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_instruct_data.py::test_split_is_deterministic_by_content",)


def disable() -> None:
  from kdlab.data import instruct

  def by_position(records, validation_fraction):
    cut = len(records) - max(1, round(len(records) * validation_fraction))
    return list(records[:cut]), list(records[cut:])

  instruct.split_records = by_position


pytest_configure = plugin(__name__, disable)
