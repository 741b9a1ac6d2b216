"""Finished-teacher check off: a teacher whose run has no summary.json (interrupted or still training) is
distilled from silently."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_validation.py::test_an_unfinished_teacher_is_refused_unless_allowed",)


def disable() -> None:
  from kdlab.train import teachers
  teachers.check_finished = lambda checkpoints, field: None


pytest_configure = plugin(__name__, disable)
