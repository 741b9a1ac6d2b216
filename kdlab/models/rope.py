"""Rotary position embeddings (RoPE) with the frequency scalings of pretrained decoders.

The inverse frequencies follow the Hugging Face ``rope_type`` definitions, computed in float32 as
transformers does (so that loaded checkpoints give the same logits):

* ``default``: ``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``;
* ``linear``: the default frequencies divided by ``factor`` (positions interpolated);
* ``llama3``: Llama 3.1's scaling: wavelengths longer than ``original_max_position_embeddings /
  low_freq_factor`` are divided by ``factor``, shorter than ``... / high_freq_factor`` kept, and
  the band between interpolated smoothly.

A scaling is given as the ``rope_scaling`` dict of a config (``{"rope_type": "llama3", "factor": 8.0,
...}``, the old key ``type`` accepted too) or ``None``. :func:`apply_rope` rotates queries and keys
in the rotate-half layout (the two halves of the head dimension pair up).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdlab.errors import UserError

SUPPORTED = ("default", "linear", "llama3")


def rope_type(scaling: Mapping[str, Any] | None) -> str:
  """The ``rope_type`` of a ``rope_scaling`` dict (``"default"`` for None)."""
  if scaling is None:
    return "default"
  return str(scaling.get("rope_type", scaling.get("type", "default")))


def inv_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None, *,
                    max_position_embeddings: int | None = None,
                    field: str = "rope_scaling") -> tuple[float, ...]:
  """The ``head_dim / 2`` inverse frequencies (float32 values) of RoPE with base ``theta``.

  ``max_position_embeddings`` is llama3's ``original_max_position_embeddings`` when the scaling
  omits it (as transformers defaults it). Errors name ``field``.
  """
  if head_dim < 2 or head_dim % 2:
    raise UserError(f"head_dim={head_dim}: rotary embeddings need an even head size")
  if not isinstance(theta, (int, float)) or not theta > 0:
    raise UserError(f"rope_theta={theta!r}: must be a positive number (e.g. 10000.0)")
  if scaling is not None and not isinstance(scaling, Mapping):
    raise UserError(f"{field}={scaling!r}: expected a dict such as {{'rope_type': 'linear', 'factor': 8.0}} "
                    f"or None")
  kind = rope_type(scaling)
  if kind not in SUPPORTED:
    raise UserError(f"{field}: rope type {kind!r} is not supported; kdlab implements {', '.join(SUPPORTED)}")
  if scaling is not None and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
    raise UserError(f"{field}.partial_rotary_factor={scaling['partial_rotary_factor']}: only 1.0 (rotate the "
                    f"whole head) is supported")
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / (np.float32(theta) ** exponent)
  if kind == "linear":
    inv = inv / np.float32(_number(scaling, "factor", field))
  elif kind == "llama3":
    inv = _llama3(inv, scaling, max_position_embeddings, field)
  return tuple(float(f) for f in inv.astype(np.float32))


def _number(scaling: Mapping[str, Any], key: str, field: str) -> float:
  value = scaling.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise UserError(f"{field}.{key}={value!r}: rope type {rope_type(scaling)!r} needs a positive number here")
  return float(value)


def _llama3(inv: np.ndarray, scaling: Mapping[str, Any], max_position_embeddings: int | None,
            field: str) -> np.ndarray:
  factor = _number(scaling, "factor", field)
  low = _number(scaling, "low_freq_factor", field)
  high = _number(scaling, "high_freq_factor", field)
  if "original_max_position_embeddings" in scaling or max_position_embeddings is None:
    context = _number(scaling, "original_max_position_embeddings", field)
  else:
    context = float(max_position_embeddings)
  if high <= low:
    raise UserError(f"{field}: llama3 needs high_freq_factor > low_freq_factor, got {high} <= {low}")
  low_wavelen, high_wavelen = np.float32(context / low), np.float32(context / high)
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
  smooth = (np.float32(context) / wavelen - np.float32(low)) / np.float32(high - low)
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
  """Rotates ``x [B, T, H, Dh]`` to absolute ``positions`` (``[T]`` or ``[B, T]``), in ``x``'s dtype.

  Angles are computed in float32; their cosines and sines are cast to ``x``'s dtype before the
  rotation (as transformers does).
  """
  freq = jnp.asarray(inv_freq, jnp.float32)
  pos = jnp.asarray(positions).astype(jnp.float32)
  pos = pos[None] if pos.ndim == 1 else pos
  angle = pos[..., None] * freq  # [B or 1, T, Dh/2]
  angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
