"""Packed rows for the decoders: several examples in one ``[B, L]`` row, told apart by segment ids.

A packed batch carries ``segment_ids`` int32 ``[B, L]`` (1, 2, 3, ... = which example of the row a
token belongs to; 0 = padding) and ``positions`` int32 ``[B, L]`` (0, 1, 2, ... restarting at each
example's first token). The decoders (``gpt`` and :class:`kdlab.models.decoders.Decoder`) build one
attention mask per forward pass from them with :func:`segment_visible` and rotate RoPE to the
``positions``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def segment_visible(segment_ids: jax.Array, positions: jax.Array, window: int | None) -> jax.Array:
  """Which keys each query of a packed row sees: ``[B, L, L]`` bool from ``segment_ids [B, L]`` and
  ``positions [B or 1, L]``: the same segment, key index <= query index, and (sliding window) key
  position > query position - ``window``. The diagonal is always True."""
  index = jnp.arange(segment_ids.shape[1])
  mask = (index[None, None, :] <= index[None, :, None]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if window is not None:
    mask = mask & (positions[:, None, :] > positions[:, :, None] - window)
  return mask


def check_packing(segment_ids: Any, positions: Any, shape: tuple[int, int]) -> tuple[Any, Any]:
  """``segment_ids`` / ``positions`` as int32 ``[B, L]`` (None stays None); ValueError otherwise."""
  out = []
  for name, x in (("segment_ids", segment_ids), ("positions", positions)):
    if x is not None:
      x = jnp.asarray(x)
      if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: expected [batch, length] = {shape} integers, got {x.dtype} {x.shape}")
      x = x.astype(jnp.int32)
    out.append(x)
  return out[0], out[1]
