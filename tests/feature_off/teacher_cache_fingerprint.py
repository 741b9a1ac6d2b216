"""Teacher-cache fingerprint check off: ``open_cache`` accepts a cache built for another teacher,
tokenizer, data or k (whatever fingerprint the run expects)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_teacher_cache.py::test_kdlab_train_refuses_a_cache_built_for_another_teacher_data_or_k",)


def disable() -> None:
  from kdlab.data import teacher_cache

  open_cache = teacher_cache.open_cache

  def unchecked(path, *, expected_fingerprint):
    meta = teacher_cache._read_meta(teacher_cache.pathlib.Path(path)) or {}
    return open_cache(path, expected_fingerprint=meta.get("fingerprint", expected_fingerprint))

  teacher_cache.open_cache = unchecked


pytest_configure = plugin(__name__, disable)
