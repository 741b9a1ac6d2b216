"""ULD's sorting off: the probability vectors are compared in vocabulary order (zero-padded), not sorted."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_cross_tokenizer.py::test_uld_equals_the_sorted_vector_l1",)


def disable() -> None:
  import jax
  import jax.numpy as jnp
  from kdlab.losses import cross_tokenizer

  def unsorted(logits, temperature, width):
    p = jax.nn.softmax(logits / temperature, axis=-1)
    return jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])])

  cross_tokenizer._sorted_probs = unsorted


pytest_configure = plugin(__name__, disable)
