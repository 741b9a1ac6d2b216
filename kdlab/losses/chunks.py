"""Chunks of token positions, shared by the chunked and fused token losses.

A chunk is every sequence's tokens at positions ``[start, start + c)``: a ``[B, c, ...]`` slice
along the length axis. Slicing (rather than reshaping the flat tokens into ``[num, chunk, ...]``
and scanning over it) keeps the batch axis intact, so batch-sharded (and vocab-sharded) inputs stay
sharded as they are and no copy of the ``[B, L, V]`` inputs is made. When ``c`` does not divide
``L`` the last chunk is ``[L - c, L)``: it overlaps the one before, and only its new positions are
kept (:func:`unchunk`) or weighted (:func:`fresh`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_BYTES = 64 * 2**20


def chunk_len(batch: int, length: int, vocab: int, chunk_size: int | None) -> int:
  """Positions per chunk: ``chunk_size // batch``, by default sized so that one ``[chunk, V]``
  float32 block is about 64 MiB (128 tokens at V = 128k; the whole batch at small V)."""
  if chunk_size is None:
    chunk_size = max(1, CHUNK_BYTES // (4 * vocab))
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return max(1, min(length, chunk_size // batch))


def _start_positions(length: int, c: int) -> np.ndarray:
  return np.minimum(np.arange(-(-length // c)) * c, length - c)


def starts(length: int, c: int) -> jax.Array:
  """``[num]`` int32: each chunk's first position."""
  return jnp.asarray(_start_positions(length, c), jnp.int32)


def take(x: jax.Array, start: jax.Array, c: int) -> jax.Array:
  """``[B, L, ...]`` -> the chunk ``[B, c, ...]`` at ``start``."""
  return jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)


def unchunk(y: jax.Array, length: int) -> jax.Array:
  """``[num, B, c, ...]`` per-chunk outputs -> ``[B, L, ...]``."""
  num, b, c = y.shape[:3]
  full = length // c
  out = jnp.moveaxis(y[:full], 0, 1).reshape(b, full * c, *y.shape[3:])
  if length % c:
    out = jnp.concatenate([out, y[-1][:, c - length % c:]], axis=1)
  return out


def fresh(length: int, c: int) -> jax.Array:
  """``[num, 1, c]`` float32: 1 for the positions each chunk is the first to cover, 0 for an
  overlapping last chunk's repeated ones (so that sums over chunks count every position once)."""
  first_pos = _start_positions(length, c)
  pos = first_pos[:, None] + np.arange(c)[None, :]
  covered = np.concatenate([[0], first_pos[:-1] + c])  # positions before this were covered already
  return jnp.asarray((pos >= covered[:, None])[:, None, :], jnp.float32)
