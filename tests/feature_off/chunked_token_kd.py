"""Chunked token KD off: only the first chunk of ``chunked_token_kd`` passes gradients back to the
student's logits (the loss values are unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_lm_train.py::test_chunked_and_fused_token_kd_train_to_the_plain_losses_and_gradients[chunked]",)


def disable() -> None:
  import jax
  import jax.numpy as jnp
  from kdlab.losses import chunks, sequence

  chunked = sequence.chunked_token_kd

  def first_chunk_only(s_logits, t_logits, mask, *, chunk_size=None, **kwargs):
    b, l, v = s_logits.shape
    first = (jnp.arange(l) < chunks.chunk_len(b, l, v, chunk_size))[None, :, None]
    s_logits = jnp.where(first, s_logits, jax.lax.stop_gradient(s_logits))
    return chunked(s_logits, t_logits, mask, chunk_size=chunk_size, **kwargs)

  sequence.chunked_token_kd = first_chunk_only


pytest_configure = plugin(__name__, disable)
