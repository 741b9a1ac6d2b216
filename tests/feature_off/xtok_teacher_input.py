"""Cross-tokenizer teachers fed the student's tokens: a teacher's ``input_key`` (its own tokenization,
``batch["teacher_tokens"]``) ignored by the train and eval steps."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_cross_tokenizer_train.py::test_uld_and_aligned_kd_train_a_student_of_another_tokenizer",
)


def disable() -> None:
  import dataclasses

  from kdlab.train import step

  original = step.run_teachers

  def student_input(teachers, variables, x, **kwargs):
    return original([dataclasses.replace(t, input_key=None) for t in teachers], variables, x, **kwargs)

  step.run_teachers = student_input


pytest_configure = plugin(__name__, disable)
