"""Input validation shared by the loss primitives (errors name the argument)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def floating(name: str, x: jax.Array) -> jax.Array:
  """Checks ``x`` is floating and returns it as float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating array, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def integer(name: str, x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an integer array, got dtype {x.dtype}")
  return x


def same_shape(a_name: str, a: jax.Array, b_name: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{a_name} and {b_name} must have the same shape, got {a.shape} and {b.shape}")


def min_rank(name: str, x: jax.Array, rank: int) -> None:
  if x.ndim < rank:
    raise ValueError(f"{name}: expected at least {rank} dimensions, got shape {x.shape}")


def positive(name: str, value: float) -> None:
  # Hyperparameters are Python numbers or (under a schedule) traced scalars; only check concrete ones.
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def open_unit(name: str, value: float) -> None:
  if isinstance(value, (int, float)) and not 0 < value < 1:
    raise ValueError(f"{name} must be in (0, 1), got {value}")


def apply_where(loss: jax.Array, where: jax.Array | None) -> jax.Array:
  """Zeroes per-example ``loss`` where ``where`` is False (callers take masked means)."""
  if where is None:
    return loss
  where = jnp.asarray(where)
  if where.shape != loss.shape:
    raise ValueError(f"where: expected shape {loss.shape} (the batch axes), got {where.shape}")
  return jnp.where(where, loss, 0.0)


def rank(name: str, x: jax.Array, ndim: int) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")


def same_leading(a_name: str, a: jax.Array, b_name: str, b: jax.Array, n: int, what: str) -> None:
  """Checks the first ``n`` axes agree (``what`` names them in the error, e.g. "batch size")."""
  if a.shape[:n] != b.shape[:n]:
    raise ValueError(f"{a_name} and {b_name} must have the same {what}, got shapes {a.shape} and {b.shape}")


def positive_int(name: str, value: int) -> None:
  # Sizes decide array shapes, so they must be concrete Python ints.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value <= 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def unit_interval(name: str, value: float) -> None:
  """Checks ``0 <= value < 1`` (concrete values only)."""
  if isinstance(value, (int, float)) and not 0 <= value < 1:
    raise ValueError(f"{name} must be in [0, 1), got {value}")
