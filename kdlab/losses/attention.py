"""Attention-based losses: conv attention maps (AT) and transformer attention (MiniLM).

Per-example losses return the batch axes; computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdlab.losses import _checks


def _attention_map(name: str, f: jax.Array, p: float) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H*W]``: channel mean of ``|f|^p``, L2-normalised over positions."""
  f = _checks.floating(name, f)
  _checks.min_rank(name, f, 3)
  a = jnp.mean(jnp.abs(f)**p, axis=-1).reshape(f.shape[0], -1)
  return a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-24))


def at(s_feat: jax.Array, t_feat: jax.Array, *, p: float = 2,
       where: jax.Array | None = None) -> jax.Array:
  """Attention transfer.

  ``a(f) = normalize(mean_c |f_c|^p)`` over flattened positions; loss per
  example = ``mean_positions (a(s) - a(t))^2``. Zagoruyko & Komodakis 2017,
  "Paying More Attention to Attention" (ICLR). The paper/RepDistiller weight
  (1000) goes in the config.

  Args:
    s_feat: ``[B, H, W, C_s]`` student features.
    t_feat: ``[B, H, W, C_t]`` teacher features; channels may differ, spatial
      sizes must match (``ValueError`` otherwise: pool in a connector).
    p: exponent, > 0.
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example losses, >= 0; the batch mean equals RepDistiller's.
  """
  _checks.positive("p", p)
  if jnp.shape(s_feat)[:-1] != jnp.shape(t_feat)[:-1]:
    raise ValueError(f"s_feat and t_feat must have the same batch and spatial shape (channels may "
                     f"differ), got {jnp.shape(s_feat)} and {jnp.shape(t_feat)}")
  a_s = _attention_map("s_feat", s_feat, p)
  a_t = _attention_map("t_feat", t_feat, p)
  return _checks.apply_where(jnp.mean(jnp.square(a_s - a_t), axis=-1), where)


def _masked_query_mean(per_query: jax.Array, where: jax.Array | None) -> jax.Array:
  """``[..., q]`` -> ``[...]``: mean over query positions, or the masked mean for a ``[..., q]`` mask."""
  if where is None:
    return jnp.mean(per_query, axis=-1)
  where = jnp.asarray(where)
  if where.shape == per_query.shape:
    count = jnp.sum(where, axis=-1)
    total = jnp.sum(jnp.where(where, per_query, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
  if where.shape != per_query.shape[:-1]:
    raise ValueError(f"where: expected shape {per_query.shape[:-1]} (examples) or {per_query.shape} "
                     f"(examples x query positions), got {where.shape}")
  return _checks.apply_where(jnp.mean(per_query, axis=-1), where)


def attention_kl(s_probs: jax.Array, t_probs: jax.Array, *,
                 where: jax.Array | None = None) -> jax.Array:
  """Self-attention distribution transfer: ``KL(A_t || A_s)`` over keys.

  Averaged over heads and query positions. Wang et al. 2020, "MiniLM: Deep
  Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
  Transformers" (NeurIPS). Terms with ``A_t = 0`` (e.g. causal or padding
  masks) contribute 0; student probabilities are floored at the smallest
  normal float32 (~1.2e-38), so an underflowed ``A_s`` gives a large but
  finite loss and gradient.

  Args:
    s_probs: ``[B, heads, q, k]`` student attention probabilities.
    t_probs: same shape, teacher (same head count).
    where: optional mask, either ``[B]`` (whole examples; masked give 0) or
      ``[B, q]`` (valid query positions: the loss averages over valid queries
      only; an example with none gives 0).

  Returns:
    ``[B]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s = _checks.floating("s_probs", s_probs)
  t = _checks.floating("t_probs", t_probs)
  _checks.same_shape("s_probs", s, "t_probs", t)
  _checks.min_rank("s_probs", s, 3)
  pos = t > 0
  # Double where: no 0 * log(0) NaN in the value or the gradient. A student probability that
  # underflowed (below the smallest normal float32) is floored there, so KL stays finite.
  log_s = jnp.log(jnp.maximum(jnp.where(pos, s, 1.0), jnp.finfo(jnp.float32).tiny))
  log_t = jnp.log(jnp.where(pos, t, 1.0))
  kl = jnp.sum(jnp.where(pos, t * (log_t - log_s), 0.0), axis=-1)
  return _masked_query_mean(jnp.mean(kl, axis=-2), where)


def value_relation(s_values: jax.Array, t_values: jax.Array, *,
                   where: jax.Array | None = None) -> jax.Array:
  """MiniLM value-relation transfer.

  ``R = softmax(V V^T / sqrt(d))`` per head ``[L, L]``; loss =
  ``KL(R_t || R_s)`` over the last axis, averaged over heads and positions.
  Wang et al. 2020, MiniLM (NeurIPS).

  Args:
    s_values: ``[B, heads, L, d_s]`` student values.
    t_values: ``[B, heads, L, d_t]`` teacher values (same heads and length;
      head sizes may differ).
    where: optional mask, ``[B]`` or ``[B, L]`` as in :func:`attention_kl`.

  Returns:
    ``[B]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s = _checks.floating("s_values", s_values)
  t = _checks.floating("t_values", t_values)
  _checks.min_rank("s_values", s, 3)
  _checks.min_rank("t_values", t, 3)
  if s.shape[:-1] != t.shape[:-1]:
    raise ValueError(f"s_values and t_values must agree except in the head size, "
                     f"got {s.shape} and {t.shape}")

  def log_relation(v):
    scores = jnp.einsum("...id,...jd->...ij", v, v) / jnp.sqrt(float(v.shape[-1]))
    return jax.nn.log_softmax(scores, axis=-1)

  log_rs, log_rt = log_relation(s), log_relation(t)
  kl = jnp.sum(jnp.exp(log_rt) * (log_rt - log_rs), axis=-1)
  return _masked_query_mean(jnp.mean(kl, axis=-2), where)
