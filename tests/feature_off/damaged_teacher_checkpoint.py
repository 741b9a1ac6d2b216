"""Damaged teacher checkpoints off: a teacher checkpoint whose files cannot be read ends in an orbax /
TensorStore traceback instead of one line naming it."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_validation.py::test_a_damaged_teacher_checkpoint_is_refused_in_one_line",)


def disable() -> None:
  from kdlab.train import checkpoint, teachers
  teachers._restore_teacher = checkpoint.restore_student


pytest_configure = plugin(__name__, disable)
