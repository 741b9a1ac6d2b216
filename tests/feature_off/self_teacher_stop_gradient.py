"""Self-teacher stop-gradient off: ``from_teacher="self"`` reads the student's taps without ``stop_gradient``."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_procedures.py::test_self_teacher_is_the_stopped_student",)


def disable() -> None:
  from kdlab.objective.terms import common
  common.teacher_output = lambda inputs, teacher: inputs.student if teacher == "self" else inputs.teachers[teacher]


pytest_configure = plugin(__name__, disable)
