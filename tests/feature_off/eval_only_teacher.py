"""Eval-only teachers off: ``config.teachers[i].eval_only`` is ignored, so the objective sees (and the train
step runs) every teacher."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_objectives.py::test_terms_cannot_name_an_eval_only_teacher",)


def disable() -> None:
  from kdlab.train import teachers
  teacher_spec = teachers.teacher_spec
  teachers.teacher_spec = lambda entry, i: {**teacher_spec(entry, i), "eval_only": False}


pytest_configure = plugin(__name__, disable)
