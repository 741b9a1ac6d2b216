"""Per-teacher sharding rules off: ``config.teachers[i].sharding_rules`` is ignored (the student's rules apply)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_fsdp.py::test_teacher_sharded_on_its_own_rules_in_its_own_dtype",)


def disable() -> None:
  from kdlab.train import teachers
  spec = teachers.teacher_spec

  def without_rules(*args, **kwargs):
    return {**spec(*args, **kwargs), "sharding_rules": None}

  teachers.teacher_spec = without_rules


pytest_configure = plugin(__name__, disable)
