"""Gradient accumulation off: ``microbatches`` is ignored and the step runs the whole batch at once
(the same update for per-example objectives; only the mechanism's traces differ)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_accumulation.py::test_term_states_and_dropout_streams_are_carried_through_the_microbatches",
    "tests/test_accumulation.py::"
    "test_term_grad_norms_average_the_microbatches_and_connector_warmup_freezes_the_student",
)


def disable() -> None:
  from kdlab.train import loop, step
  make_train_step = step.make_train_step

  def whole_batch(*args, microbatches=1, **kwargs):
    return make_train_step(*args, **kwargs)

  step.make_train_step = loop.make_train_step = whole_batch


pytest_configure = plugin(__name__, disable)
