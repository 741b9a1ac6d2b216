"""Given positions off: RoPE in the decoders rotates to each token's index in the row, whatever
``positions`` says (packed examples then see each other at the row's distances)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_packing_model.py::test_rope_rotates_to_the_given_positions[llama]",
    "tests/test_packing_model.py::test_rope_rotates_to_the_given_positions[gpt]",
)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.models import decoders, gpt
  apply_rope, rope = decoders.apply_rope, gpt.rope

  def index(x):
    return jnp.arange(x.shape[1])

  decoders.apply_rope = lambda x, positions, inv_freq: apply_rope(x, index(x), inv_freq)
  gpt.rope = lambda x, positions, base=10000.0: rope(x, index(x), base)


pytest_configure = plugin(__name__, disable)
