"""gpt rematerialization off: ``remat="full"``/``"dots"`` run the blocks plainly (every activation kept)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_gpt_precision.py::test_remat_checkpoints_each_block",)


def disable() -> None:
  from kdlab.models import gpt

  def block_fn(self, *, train, want_probs):
    return lambda block, x: block(x, train=train, want_probs=want_probs)

  gpt.GPT._block_fn = block_fn


pytest_configure = plugin(__name__, disable)
