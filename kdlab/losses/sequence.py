"""Token-level distillation over ``[batch, length, vocab]``, including large vocabularies.

Every function here returns per-sequence losses ``[batch]``: the per-token
divergence is reduced by a masked mean over the sequence's tokens,

    loss_b = sum_l mask_bl * div_bl / sum_l mask_bl    (0 for a sequence with no real tokens)

so the caller decides how sequences are combined (mean, masked mean, sum). Every function also
takes ``weights [B, L]`` (per-token weights, e.g. ``token_mask * B / N`` for one mean per token
over a whole batch of ``B`` sequences and ``N`` tokens); then

    loss_b = sum_l weights_bl * div_bl    (tokens of weight 0 may hold nan or inf)

and the mask only fixes the shape.

Three ways to compute the same value:
  * ``token_loss``: plain; the full ``[batch, length, vocab]`` probabilities exist.
  * ``chunked_token_kd``: from full logits, but only one ``[chunk, vocab]`` block of
    probabilities at a time, forward and backward (``lax.map`` over a ``jax.checkpoint``ed body).
  * ``kdlab.losses.fused_head.fused_token_kd``: from final hidden states and unembedding
    matrices; the ``[batch * length, vocab]`` logits are never materialized, forward or backward.

Divergences (per token, ``p = softmax(logits / T)``; those of ``kdlab.losses.logits``):
  * ``kd``:          ``T^2 KL(p_t || p_s)`` (Hinton et al. 2015)
  * ``reverse_kl``:  ``T^2 KL(p_s || p_t)`` (mode seeking; Gu et al. 2024, "MiniLLM")
  * ``jsd``:         ``T^2 [beta KL(p_t || m) + (1 - beta) KL(p_s || m)]``, ``m = beta p_t + (1 - beta) p_s``
                     (generalized JSD; Agarwal et al. 2024, "On-Policy Distillation of LMs")
  * ``tvd``:         ``0.5 sum |p_t - p_s|`` (total variation distance; no ``T^2``)

``topk_kd`` distils from a teacher stored as top-k log-probabilities plus one bucket
for the remaining mass (the teacher-output cache).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kdlab.losses import _checks, chunks
from kdlab.losses import logits as _logits

Divergence = Callable[..., jax.Array]
DIVERGENCES = ("kd", "reverse_kl", "jsd", "tvd")


# --- per-token divergences: the logit losses, fn(s, t, temperature, beta) -> [...] ----------------

_PER_TOKEN: dict[str, Callable[..., jax.Array]] = {
    "kd": lambda s, t, temperature, beta: _logits.kd(s, t, temperature=temperature),
    "reverse_kl": lambda s, t, temperature, beta: _logits.reverse_kl(s, t, temperature=temperature),
    "jsd": lambda s, t, temperature, beta: _logits.jsd(s, t, beta=beta, temperature=temperature),
    "tvd": lambda s, t, temperature, beta: _logits.tvd(s, t, temperature=temperature),
}


def _divergence(name: str) -> Callable[..., jax.Array]:
  if name not in _PER_TOKEN:
    raise ValueError(f"divergence: unknown {name!r}; choose one of {', '.join(DIVERGENCES)}")
  return _PER_TOKEN[name]


def divergence_fn(name: str) -> Divergence:
  """The per-token divergence ``name`` as ``fn(s, t, *, temperature=1.0, beta=0.5) -> [...]``.

  For ``token_loss``: ``token_loss(divergence_fn("jsd"), s, t, mask, beta=0.9)``.
  """
  fn = _divergence(name)

  def div(s: jax.Array, t: jax.Array, *, temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    s, t = _check_pair(s, t)
    return fn(s.astype(jnp.float32), t.astype(jnp.float32), temperature, beta)

  div.__name__ = name
  return div


_named_divergence = divergence_fn  # token_loss's argument shadows the name


# --- checks and reductions ----------------------------------------------------------------------

def _check_pair(s: jax.Array, t: jax.Array, s_name: str = "s_logits",
                t_name: str = "t_logits") -> tuple[jax.Array, jax.Array]:
  # Checks dtypes without casting: a float32 copy of bf16 [B, L, V] logits is what chunking avoids.
  s, t = jnp.asarray(s), jnp.asarray(t)
  for name, x in ((s_name, s), (t_name, t)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a floating array, got dtype {x.dtype}")
  _checks.same_shape(s_name, s, t_name, t)
  return s, t


def _check_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape != shape:
    raise ValueError(f"mask: expected shape {shape} ([batch, length]), got {mask.shape}")
  return mask.astype(jnp.float32)


def check_hparams(divergence: str, temperature, beta) -> None:
  """Refuses an unknown divergence, a temperature <= 0, a JSD beta outside (0, 1)."""
  _divergence(divergence)
  _checks.positive("temperature", temperature)
  if divergence == "jsd":
    _checks.open_unit("beta", beta)


def _token_weights(mask: jax.Array) -> jax.Array:
  """``[B, L]`` mask -> ``[B, L]`` weights ``mask / sum_l mask`` (0 in sequences with no tokens)."""
  count = jnp.sum(mask, axis=-1, keepdims=True)
  return jnp.where(count > 0, mask / jnp.where(count > 0, count, 1.0), 0.0)


def reduction_weights(mask: jax.Array, weights: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """The ``[B, L]`` token weights of a per-sequence reduction ``sum_l w_bl * loss_bl``: ``weights``
  if given, else the masked mean's (``mask / sum_l mask``); both checked against ``shape``."""
  mask = _check_mask(mask, shape)
  if weights is None:
    return _token_weights(mask)
  weights = jnp.asarray(weights)
  if weights.shape != shape or not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f"weights: expected float [batch, length] = {shape}, got {weights.dtype} {weights.shape}")
  return weights.astype(jnp.float32)


def masked_sequence_mean(per_token: jax.Array, mask: jax.Array, *, weights: jax.Array | None = None) -> jax.Array:
  """``[B, L]`` per-token values -> ``[B]`` masked means (masked tokens may hold nan or inf), or
  ``sum_l weights * per_token`` with ``weights [B, L]``."""
  w = reduction_weights(mask, weights, per_token.shape)
  return jnp.sum(jnp.where(w != 0, w * per_token, 0.0), axis=-1)


# --- plain ---------------------------------------------------------------------------------------

def token_loss(divergence_fn: Divergence | str, s_logits: jax.Array, t_logits: jax.Array,
               mask: jax.Array, *, weights: jax.Array | None = None, **hparams) -> jax.Array:
  """Per-sequence token-level distillation loss (plain: full probabilities exist).

  Args:
    divergence_fn: a per-example divergence ``fn(s, t, **hparams) -> [...]`` over the last
      axis (e.g. ``kdlab.losses.logits.kd``), or one of the names in ``DIVERGENCES``.
    s_logits: ``[B, L, V]`` student logits.
    t_logits: ``[B, L, V]`` teacher logits.
    mask: ``[B, L]`` 1 (or True) for tokens that count, 0 for padding.
    weights: optional float ``[B, L]`` token weights replacing the per-sequence mean.
    **hparams: passed to ``divergence_fn`` (``temperature``, ``beta``).

  Returns:
    ``[B]``: ``sum_l mask * div / sum_l mask`` (0 for a sequence without real tokens), or
    ``sum_l weights * div``.

  Example:
    >>> token_loss(kdlab.losses.logits.kd, s, t, mask, temperature=2.0)
  """
  if isinstance(divergence_fn, str):
    divergence_fn = _named_divergence(divergence_fn)
  s_logits, t_logits = _check_pair(s_logits, t_logits)
  if s_logits.ndim != 3:
    raise ValueError(f"s_logits: expected [batch, length, vocab], got shape {s_logits.shape}")
  per_token = divergence_fn(s_logits, t_logits, **hparams)
  if per_token.shape != s_logits.shape[:2]:
    raise ValueError(f"divergence_fn: expected per-token values of shape {s_logits.shape[:2]}, "
                     f"got {per_token.shape}")
  return masked_sequence_mean(per_token, mask, weights=weights)


# --- chunking along the sequence -----------------------------------------------------------------
# --- chunked, from logits --------------------------------------------------------------------------

def chunked_token_kd(s_logits: jax.Array, t_logits: jax.Array, mask: jax.Array, *,
                     divergence: str = "kd", chunk_size: int | None = None,
                     temperature: float = 1.0, beta: float = 0.5,
                     weights: jax.Array | None = None) -> jax.Array:
  """``token_loss`` computed one ``[chunk_size, V]`` block of tokens at a time.

  Each chunk holds every sequence's tokens at ``chunk_size // batch`` consecutive positions
  (at least one). Chunks are mapped with ``lax.map`` over a ``jax.checkpoint``ed body, so the
  backward pass recomputes each chunk's probabilities instead of storing them: at most one chunk
  of ``[chunk_size, V]`` float32 intermediates exists at once, besides the inputs and the
  ``[B, L, V]`` gradient. Gradients flow to both logits. Batch- and vocab-sharded inputs keep
  their sharding.

  Args:
    s_logits, t_logits: ``[B, L, V]`` student and teacher logits (any float dtype; each chunk is
      computed in float32).
    mask: ``[B, L]`` token mask (1 = counts).
    divergence: one of ``DIVERGENCES``.
    chunk_size: tokens per chunk; default: a ``[chunk, V]`` float32 block of about 64 MiB.
    temperature: softening temperature, > 0.
    beta: JSD mixing weight in (0, 1) (``jsd`` only).
    weights: optional float ``[B, L]`` token weights replacing the per-sequence mean.

  Returns:
    ``[B]`` per-sequence losses, equal to ``token_loss(divergence, ...)``.
  """
  s_logits, t_logits = _check_pair(s_logits, t_logits)
  if s_logits.ndim != 3:
    raise ValueError(f"s_logits: expected [batch, length, vocab], got shape {s_logits.shape}")
  check_hparams(divergence, temperature, beta)
  b, l, v = s_logits.shape
  mask = _check_mask(mask, (b, l))
  if weights is not None:
    reduction_weights(mask, weights, (b, l))  # checked before the chunks are traced
  fn = _divergence(divergence)
  c = chunks.chunk_len(b, l, v, chunk_size)

  @jax.checkpoint
  def body(start):
    s_c, t_c = chunks.take(s_logits, start, c), chunks.take(t_logits, start, c)
    return fn(s_c.astype(jnp.float32), t_c.astype(jnp.float32), temperature, beta)

  per_token = chunks.unchunk(jax.lax.map(body, chunks.starts(l, c)), l)
  return masked_sequence_mean(per_token, mask, weights=weights)


# --- top-k teacher -------------------------------------------------------------------------------

def topk_kd(s_logits: jax.Array, topk_logprobs: jax.Array, topk_indices: jax.Array,
            mask: jax.Array, *, temperature: float = 1.0,
            rest_logprobs: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
  """KD against a teacher stored as its top-k log-probabilities plus the remaining mass.

  The teacher distribution is taken over ``k + 1`` categories: the k stored tokens and one
  bucket holding the rest of the mass ``r = 1 - sum_k p_k`` (``rest_logprobs = log r`` if given,
  which a cache computes exactly, else from the stored log-probs, floored at 0). The student's
  probabilities are gathered at the same k tokens and its mass outside them summed into the
  bucket. Loss per token: ``T^2 KL(q_t || q_s)`` over the k + 1 categories. The student is
  tempered as usual (``softmax(s / T)``, its tail mass summed exactly); the teacher's top-k as
  ``p^(1/T)`` and its tail as if ``r`` were spread evenly over the ``V - k`` other tokens
  (``(V - k) (r / (V - k))^(1/T)``), then renormalized: exact for ``T = 1``, an approximation of
  the tempered tail otherwise. With ``k = V`` there is no bucket and this equals ``kd`` exactly.

  Args:
    s_logits: ``[B, L, V]`` student logits.
    topk_logprobs: ``[B, L, k]`` teacher log-probabilities (at temperature 1) of its top k tokens.
    topk_indices: ``[B, L, k]`` their token ids (distinct per token).
    mask: ``[B, L]`` token mask.
    temperature: softening temperature, > 0.
    rest_logprobs: optional ``[B, L]`` log of the teacher's mass outside the top k.
    weights: optional float ``[B, L]`` token weights replacing the per-sequence mean.

  Returns:
    ``[B]`` per-sequence losses.
  """
  s = _checks.floating("s_logits", s_logits)
  lp = _checks.floating("topk_logprobs", topk_logprobs)
  idx = _checks.integer("topk_indices", topk_indices)
  _checks.same_shape("topk_logprobs", lp, "topk_indices", idx)
  if s.ndim != 3 or lp.ndim != 3 or lp.shape[:2] != s.shape[:2]:
    raise ValueError(f"topk_logprobs: expected [batch, length, k] with [batch, length] = "
                     f"{s.shape[:2]}, got {lp.shape} (s_logits {s.shape})")
  k, v = lp.shape[-1], s.shape[-1]
  if k > v:
    raise ValueError(f"topk_logprobs: k = {k} exceeds the student's vocab size {v}")
  _checks.positive("temperature", temperature)
  mask = _check_mask(mask, s.shape[:2])
  if weights is not None:
    reduction_weights(mask, weights, s.shape[:2])

  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_ps_k = jnp.take_along_axis(log_ps, idx, axis=-1)
  log_qt = lp / temperature
  if k < v:
    in_topk = jnp.put_along_axis(jnp.zeros(s.shape, bool), idx, True, axis=-1, inplace=False)
    log_ps_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, log_ps), axis=-1)
    if rest_logprobs is None:
      rest = -jnp.expm1(jax.nn.logsumexp(lp, axis=-1))
      rest_logprobs = jnp.where(rest > 0, jnp.log(jnp.where(rest > 0, rest, 1.0)), -jnp.inf)
    else:
      rest_logprobs = _checks.floating("rest_logprobs", rest_logprobs)
      if rest_logprobs.shape != s.shape[:2]:
        raise ValueError(f"rest_logprobs: expected shape {s.shape[:2]}, got {rest_logprobs.shape}")
    log_ps_k = jnp.concatenate([log_ps_k, log_ps_rest[..., None]], axis=-1)
    # The tail's tempered mass, taking its r spread evenly over the V - k tokens (exact at T = 1).
    log_tail = jnp.log(v - k) + (rest_logprobs - jnp.log(v - k)) / temperature
    log_qt = jnp.concatenate([log_qt, log_tail[..., None]], axis=-1)
  log_qt = jax.nn.log_softmax(log_qt, axis=-1)
  qt = jnp.exp(log_qt)
  safe_log_qt = jnp.where(qt > 0, log_qt, 0.0)
  per_token = temperature**2 * jnp.sum(jnp.where(qt > 0, qt * (safe_log_qt - log_ps_k), 0.0), axis=-1)
  return masked_sequence_mean(per_token, mask, weights=weights)
