"""Chunk likelihoods off: a chunk's log-probability is the mean of its tokens' (not their sum)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_cross_tokenizer.py::test_aligned_kd_equals_the_chunk_binary_kl",)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.losses import cross_tokenizer

  chunk_logprobs = cross_tokenizer.chunk_logprobs

  def mean_logprobs(token_lp, chunks, num_chunks):
    sums, counts = chunk_logprobs(token_lp, chunks, num_chunks)
    return sums / jnp.maximum(counts, 1), counts

  cross_tokenizer.chunk_logprobs = mean_logprobs


pytest_configure = plugin(__name__, disable)
