"""Token losses computed from the output head's input: ``[B, L, V]`` logits never exist.

A language model's logits are ``hidden @ unembedding``. At a large vocabulary (128k) the
``[B, L, V]`` logits, their probabilities and their gradient are the largest buffers of a
distillation step. Here tokens are processed a chunk at a time (every sequence's ``c``
consecutive positions, as in :mod:`kdlab.losses.sequence`): each chunk's student logits (and
teacher logits) are computed once, reduced to every requested per-token loss and to that
chunk's contribution to the gradients, then dropped.

  * :func:`fused_token_kd`: one divergence to a teacher (``kd``, ``reverse_kl``, ``jsd``, ``tvd``).
  * :func:`fused_head_losses`: several per-token losses of one student head in one pass (the
    cross-entropy with the targets and divergences to one teacher share each chunk's logits),
    their weighted sum as the differentiable output, and the student's argmax token per position
    (train accuracy without the logits).

Every loss is reduced per sequence exactly as in :mod:`kdlab.losses.sequence`: the masked mean over
the sequence's tokens, or ``sum_l weights_bl * loss_bl`` with token ``weights``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from kdlab.losses import _checks, chunks
from kdlab.losses import logits as _logits
from kdlab.losses.sequence import check_hparams, divergence_fn, reduction_weights

CE = "ce"


@dataclasses.dataclass(frozen=True)
class Part:
  """One per-token loss of the student's logits ``s`` (and the teacher's ``t``, the targets ``y``).

  Attributes:
    kind: ``"ce"`` (cross-entropy with ``y``) or one of ``kdlab.losses.sequence.DIVERGENCES`` (``s`` against ``t``).
    temperature: softening temperature of a divergence, > 0.
    beta: JSD mixing weight in (0, 1) (``jsd`` only).
    label_smoothing: of ``ce``, in [0, 1).
  """
  kind: str
  temperature: float = 1.0
  beta: float = 0.5
  label_smoothing: float = 0.0

  def check(self) -> None:
    if self.kind == CE:
      if not 0.0 <= self.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    else:
      check_hparams(self.kind, self.temperature, self.beta)


@dataclasses.dataclass(frozen=True)
class HeadLosses:
  """What :func:`fused_head_losses` returns.

  Attributes:
    combined: ``[B]`` ``sum_k coef_k * per_part[k]``, the differentiable output.
    per_part: ``[K, B]`` each part's per-sequence loss (under ``stop_gradient``: for logging).
    predictions: ``[B, L]`` int32, the student's argmax token at each position.
  """
  combined: jax.Array
  per_part: jax.Array
  predictions: jax.Array


def _matmul(h: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(jnp.float32)


def _sharded_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded as ``like`` under explicit mesh axes (a cotangent must match its primal's
  type there); unchanged otherwise."""
  want = jax.typeof(like).sharding
  mesh = getattr(want, "mesh", None)
  if mesh is None or mesh.empty or not mesh.are_all_axes_explicit or jax.typeof(x).sharding == want:
    return x
  return jax.sharding.reshard(x, want.spec)


def _per_token(kinds: tuple[tuple[str, float], ...], s: jax.Array, t: jax.Array | None, y: jax.Array | None,
               hp: jax.Array) -> jax.Array:
  """``[B, c, V]`` student (and teacher) logits of a chunk -> ``[B, c, K]`` per-token losses."""
  out = []
  for k, (kind, label_smoothing) in enumerate(kinds):
    if kind == CE:
      out.append(_logits.ce(s, y, label_smoothing=label_smoothing))
    else:
      out.append(divergence_fn(kind)(s, t, temperature=hp[k, 0], beta=hp[k, 1]))
  return jnp.stack(out, axis=-1)


def _scan(kinds, c, s_h, s_w, t_h, t_w, y, w, hp, coef, *, grads: bool, values: bool = True):
  """One scan over the chunks: per-token losses and argmax (``values``), and the gradients of
  ``sum_{b,l,k} coef_k w_bl loss_blk`` (``grads``: ``dW`` summed, ``dh`` per chunk; ``w`` may
  carry a per-sequence cotangent). Returns ``(dW or None, [outputs as [B, L, ...]])``."""
  l = s_h.shape[1]

  def body(dw, xs):
    start, keep = xs
    s_c = chunks.take(s_h, start, c)
    t_logits = None if t_h is None else _matmul(chunks.take(t_h, start, c), t_w)
    y_c = None if y is None else chunks.take(y, start, c)

    def losses(h, u):
      s = _matmul(h, u)
      return _per_token(kinds, s, t_logits, y_c, hp), s

    if not grads:
      per_token, s_logits = losses(s_c, s_w)
      return dw, (per_token, jnp.argmax(s_logits, axis=-1).astype(jnp.int32))
    per_token, vjp, s_logits = jax.vjp(losses, s_c, s_w, has_aux=True)
    w_c = chunks.take(w, start, c) * keep
    dh_c, dw_c = vjp(_sharded_like(w_c[..., None] * coef, per_token))
    out = (per_token, jnp.argmax(s_logits, axis=-1).astype(jnp.int32)) if values else ()
    return dw + dw_c.astype(jnp.float32), out + (dh_c,)

  dw0 = jnp.zeros_like(s_w, dtype=jnp.float32) if grads else None
  dw, outs = jax.lax.scan(body, dw0, (chunks.starts(l, c), chunks.fresh(l, c)))
  return dw, [chunks.unchunk(o, l) for o in outs]


def _reduce(per_token: jax.Array, w: jax.Array) -> jax.Array:
  """``[B, L, K]`` per-token losses, ``[B, L]`` weights -> ``[K, B]``."""
  return jnp.sum(jnp.where(w[..., None] != 0, w[..., None] * per_token, 0.0), axis=1).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(kinds, c, s_h, s_w, t_h, t_w, y, w, hp, coef):
  _, (per_token, predictions) = _scan(kinds, c, s_h, s_w, t_h, t_w, y, w, hp, coef, grads=False)
  per_part = _reduce(per_token, w)
  return coef @ per_part, per_part, predictions


def _fused_fwd(kinds, c, s_h, s_w, t_h, t_w, y, w, hp, coef):
  # The combined loss is linear in the per-token losses, so each chunk's gradient (for the token
  # weights w) is computed right away, while its logits exist: the backward pass then needs no
  # recomputation of the [chunk, D] x [D, V] products (jax.checkpoint would redo both: ~1.5x the
  # matmul work). d/dh is exact for any cotangent (a token's h only feeds its own losses); d/dW
  # sums over tokens: exact here for a cotangent uniform over the batch (a mean or sum of the
  # losses), and recomputed chunk by chunk in _fused_bwd otherwise.
  dw, (per_token, predictions, dh) = _scan(kinds, c, s_h, s_w, t_h, t_w, y, w, hp, coef, grads=True)
  per_part = _reduce(per_token, w)
  res = (s_h, s_w, t_h, t_w, y, w, hp, coef, per_part, dh, dw)
  return (coef @ per_part, per_part, predictions), res


def _fused_bwd(kinds, c, res, cotangents):
  s_h, s_w, t_h, t_w, y, w, hp, coef, per_part, dh, dw = res
  g = cotangents[0]  # per_part leaves fused_head_losses under stop_gradient: its cotangent is 0

  def recompute_dw():  # exact for any g: the chunks again, with token weights w * g
    return _scan(kinds, c, s_h, s_w, t_h, t_w, y, w * g[:, None], hp, coef, grads=True, values=False)[0]

  dw = jax.lax.cond(jnp.all(g == g[0]), lambda: dw * g[0], recompute_dw)
  dh = dh * g[:, None, None].astype(dh.dtype)
  # The teacher is a fixed target: no gradient to t_h, t_w (as if wrapped in stop_gradient).
  d_coef = jnp.sum(per_part * g[None, :], axis=1)  # not per_part @ g: B may be sharded (explicit axes)
  return dh.astype(s_h.dtype), dw.astype(s_w.dtype), None, None, None, None, None, d_coef


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check_array(name: str, x: jax.Array, rank: int) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating array, got dtype {jnp.asarray(x).dtype}")
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name}: expected rank {rank}, got shape {jnp.shape(x)}")


def fused_head_losses(s_hidden: jax.Array, s_unembed: jax.Array, mask: jax.Array, parts: Sequence[Part], *,
                      coef: jax.Array | Sequence[float] | None = None, targets: jax.Array | None = None,
                      t_hidden: jax.Array | None = None, t_unembed: jax.Array | None = None,
                      weights: jax.Array | None = None, chunk_size: int | None = None) -> HeadLosses:
  """Several per-token losses of one student head, computed together chunk by chunk.

  Each chunk's student logits ``s_hidden @ s_unembed`` (and teacher logits, when a part is a
  divergence) are computed once and shared by every part. Equal to the plain losses, e.g.
  ``ce(s, targets)`` and ``token_loss(kind, s, t, mask)``, reduced per sequence.

  Gradients: of ``combined`` w.r.t. ``s_hidden``, ``s_unembed`` and ``coef``; the teacher is a
  fixed target (zero gradient). The ``s_unembed`` gradient is computed during the forward pass
  for the common cotangent (uniform over the batch: a mean or sum of ``combined``); any other
  weighting is also exact but recomputes the chunks once more. Reverse-mode only.

  Args:
    s_hidden: ``[B, L, Ds]`` student final (normed) hidden states, the unembedding's input.
    s_unembed: ``[Ds, V]`` student unembedding matrix (tied models: the embedding transposed).
    mask: ``[B, L]`` token mask (1 = counts).
    parts: the K per-token losses.
    coef: ``[K]`` weights of ``combined`` (may be traced, e.g. scheduled); default all 1.
    targets: ``[B, L]`` int target tokens (``ce`` parts).
    t_hidden: ``[B, L, Dt]`` teacher final hidden states (divergence parts).
    t_unembed: ``[Dt, V]`` teacher unembedding matrix (divergence parts).
    weights: optional float ``[B, L]`` token weights replacing the per-sequence mean.
    chunk_size: tokens per chunk; default: a ``[chunk, V]`` float32 block of about 64 MiB.

  Returns:
    :class:`HeadLosses`: ``combined [B]``, ``per_part [K, B]``, ``predictions [B, L]``.
  """
  parts = tuple(parts)
  if not parts:
    raise ValueError("parts: give at least one Part")
  for part in parts:
    part.check()
  _check_array("s_hidden", s_hidden, 3)
  _check_array("s_unembed", s_unembed, 2)
  b, l, ds = s_hidden.shape
  if s_unembed.shape[0] != ds:
    raise ValueError(f"s_unembed: expected [{ds}, vocab] (s_hidden's width first), got {s_unembed.shape}")
  if any(p.kind == CE for p in parts):
    if targets is None:
      raise ValueError("targets: a 'ce' part needs the [batch, length] target tokens")
    targets = _checks.integer("targets", targets)
    if targets.shape != (b, l):
      raise ValueError(f"targets: expected shape {(b, l)} ([batch, length]), got {targets.shape}")
  else:
    targets = None
  if any(p.kind != CE for p in parts):
    if t_hidden is None or t_unembed is None:
      raise ValueError("t_hidden, t_unembed: a divergence part needs the teacher's hidden states and unembedding")
    _check_array("t_hidden", t_hidden, 3)
    _check_array("t_unembed", t_unembed, 2)
    if t_hidden.shape[:2] != (b, l):
      raise ValueError(f"t_hidden: expected [batch, length] = {(b, l)} leading axes, got {t_hidden.shape}")
    if t_unembed.shape[0] != t_hidden.shape[2]:
      raise ValueError(f"t_unembed: expected [{t_hidden.shape[2]}, vocab] (t_hidden's width first), "
                       f"got {t_unembed.shape}")
    if s_unembed.shape[1] != t_unembed.shape[1]:
      raise ValueError(f"s_unembed and t_unembed: vocab sizes differ: {s_unembed.shape[1]} vs "
                       f"{t_unembed.shape[1]}")
  else:
    t_hidden = t_unembed = None
  coef = jnp.ones((len(parts),), jnp.float32) if coef is None else jnp.asarray(coef, jnp.float32)
  if coef.shape != (len(parts),):
    raise ValueError(f"coef: expected shape ({len(parts)},) (one weight per part), got {coef.shape}")
  w = reduction_weights(mask, weights, (b, l))
  kinds = tuple((p.kind, float(p.label_smoothing)) for p in parts)
  hp = jnp.stack([jnp.stack([jnp.asarray(p.temperature, jnp.float32), jnp.asarray(p.beta, jnp.float32)])
                  for p in parts])
  c = chunks.chunk_len(b, l, s_unembed.shape[1], chunk_size)
  combined, per_part, predictions = _fused(kinds, c, s_hidden, s_unembed, t_hidden, t_unembed, targets, w, hp, coef)
  return HeadLosses(combined, jax.lax.stop_gradient(per_part), predictions)


def fused_token_kd(s_hidden: jax.Array, s_unembed: jax.Array, t_hidden: jax.Array,
                   t_unembed: jax.Array, mask: jax.Array, *, divergence: str = "kd",
                   chunk_size: int | None = None, temperature: float = 1.0,
                   beta: float = 0.5, weights: jax.Array | None = None) -> jax.Array:
  """Token-level distillation from hidden states, never materializing ``[B * L, V]`` logits.

  Equal to ``token_loss(divergence, s_hidden @ s_unembed, t_hidden @ t_unembed, mask, ...)``.
  Peak extra memory is a few ``[chunk_size, V]`` float32 blocks plus one ``[Ds, V]`` gradient
  accumulator. Gradients as in :func:`fused_head_losses` (w.r.t. ``s_hidden`` and ``s_unembed``).

  Args:
    s_hidden: ``[B, L, Ds]`` student final (normed) hidden states, the unembedding's input.
    s_unembed: ``[Ds, V]`` student unembedding matrix (tied models: the embedding transposed).
    t_hidden: ``[B, L, Dt]`` teacher final hidden states.
    t_unembed: ``[Dt, V]`` teacher unembedding matrix.
    mask: ``[B, L]`` token mask (1 = counts).
    divergence: one of ``kdlab.losses.sequence.DIVERGENCES``.
    chunk_size: tokens per chunk; default: a ``[chunk, V]`` float32 block of about 64 MiB.
    temperature: softening temperature, > 0 (may be a traced scalar).
    beta: JSD mixing weight in (0, 1) (``jsd`` only).
    weights: optional float ``[B, L]`` token weights replacing the per-sequence mean.

  Returns:
    ``[B]`` per-sequence losses.
  """
  return fused_head_losses(s_hidden, s_unembed, mask, [Part(divergence, temperature, beta)], t_hidden=t_hidden,
                           t_unembed=t_unembed, weights=weights, chunk_size=chunk_size).combined
