"""Global per-token normalization off: ``make_train_step`` ignores ``token_normalization="global"``
(the per-sequence means, as before; no ``token_weights`` in the batch)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_packing_model.py::test_packed_loss_equals_the_unpacked_loss_under_global_normalization",
    "tests/test_packing_model.py::test_global_normalization_is_the_same_for_1_and_4_microbatches",
)


def disable() -> None:
  from kdlab.train import loop, step
  make_train_step = step.make_train_step

  def per_sequence(*args, token_normalization="sequence", **kwargs):
    return make_train_step(*args, **kwargs)

  step.make_train_step = loop.make_train_step = per_sequence


pytest_configure = plugin(__name__, disable)
