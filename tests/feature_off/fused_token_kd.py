"""Fused token KD off: only the first chunk of ``fused_head_losses`` (every fused loss) passes
gradients back to the student's hidden states (the loss values are unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_lm_train.py::test_chunked_and_fused_token_kd_train_to_the_plain_losses_and_gradients[fused]",
          "tests/test_fused_head.py::test_a_fused_ce_and_kd_step_equals_the_plain_step")


def disable() -> None:
  import jax
  import jax.numpy as jnp
  from kdlab.losses import chunks, fused_head

  fused = fused_head.fused_head_losses

  def first_chunk_only(s_hidden, s_unembed, *args, chunk_size=None, **kwargs):
    b, l, _ = s_hidden.shape
    first = (jnp.arange(l) < chunks.chunk_len(b, l, s_unembed.shape[-1], chunk_size))[None, :, None]
    s_hidden = jnp.where(first, s_hidden, jax.lax.stop_gradient(s_hidden))
    return fused(s_hidden, s_unembed, *args, chunk_size=chunk_size, **kwargs)

  fused_head.fused_head_losses = first_chunk_only


pytest_configure = plugin(__name__, disable)
