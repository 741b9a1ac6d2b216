"""Distillation between a teacher and a student with different tokenizers (vocabularies).

Both models read the same text, each tokenized its own way: the student ``L_s`` tokens over a vocab
of ``V_s``, the teacher ``L_t`` tokens over ``V_t``. Position ``l`` of a model's logits predicts
its target token ``l`` (the next token; ``targets`` as in :mod:`kdlab.data.pipeline`).

**ULD** (Universal Logit Distillation; Boizard et al. 2024): the i-th counted (masked-in) position
of the student is paired with the i-th counted position of the teacher, for ``i < K = min(n_s,
n_t)`` (the longer side is truncated). Per pair, with ``p = softmax(logits / T)`` and ``sort``
sorting descending, the shorter vocabulary zero-padded to ``V = max(V_s, V_t)``:

    uld_i = sum_{j < V} | sort(p_s)_j - sort(p_t)_j |

the L1 distance between the two distributions minimized over every one-to-one relabelling of the
tokens (matching the sorted orders attains the minimum): the closed form Boizard et al. derive for
the Wasserstein-1 distance between vocabularies with no shared token identities. It is computed
exactly over the whole vocabularies (no top-k truncation). The per-sequence loss is the mean over
the ``K`` pairs.

**Chunk likelihood matching** (``aligned_kd``; the approximate likelihood matching of Minixhofer et
al. 2025, "ALM", with the binary KL as its f-divergence): the completion text is cut into chunks
whose boundaries are token boundaries in both tokenizations (:mod:`kdlab.data.alignment` computes
them from the tokens' character spans). A model's log-probability of chunk ``c`` is the sum of its
tokens' teacher-forced log-probabilities, ``log P(c) = sum_{l in c} log softmax(logits_l / T)[y_l]``:
the probability that the text continues with the chunk's characters, tokenized that way. With
``p = P_t(c)`` and ``q = P_s(c)`` (teacher, student):

    D_c = KL(Bernoulli(p) || Bernoulli(q)) = p log(p / q) + (1 - p) log((1 - p) / (1 - q))

The binary KL compares the two models' answers to the same question ("does the text go on with
these characters?") without asking what else they would have predicted, which the two vocabularies
cannot express in common. It is smooth, 0 with zero gradient exactly when ``q = p``, and, unlike a
difference of log-probabilities, it weighs a chunk by how much probability is at stake (a chunk both
models find very unlikely costs little). Each chunk's divergence is spread evenly over its student
tokens, and the per-sequence loss is the mean over the student tokens that belong to a chunk,

    loss = sum_c D_c / sum_c |c|_s

(nats per student token, the unit of ``ce``), so that ``weights`` (a global per-token
normalization) apply as they do to token losses.

Both functions take ``weights [B, L_s]`` (optional): per-student-position weights replacing the
per-sequence mean (``loss_b = sum_l weights_bl * value_bl``, the value of a student position being
its ULD pair distance, or its share ``D_c / |c|_s`` of its chunk); positions without a pair or chunk
count 0. All values are float32; gradients flow to both logits (the caller stops the teacher's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdlab.losses import _checks

# Chunk log-probabilities are kept below -_EPS (P < 1 - 1e-6) so that log(1 - P) stays finite.
_EPS = 1e-6


def _logits(name: str, x: jax.Array) -> jax.Array:
  x = _checks.floating(name, x)
  _checks.rank(name, x, 3)
  return x


def _logit_pair(s_logits: jax.Array, t_logits: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Both sides' ``[B, L, V]`` logits checked (floating, rank 3, one batch size) and ``temperature > 0``."""
  s, t = _logits("s_logits", s_logits), _logits("t_logits", t_logits)
  _checks.same_leading("s_logits", s, "t_logits", t, 1, "batch size")
  _checks.positive("temperature", temperature)
  return s, t


def _per_position(name: str, x: jax.Array, shape: tuple[int, int], kind: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.shape != shape:
    raise ValueError(f"{name}: expected shape {shape} ([batch, length] of its logits), got {x.shape}")
  if kind == "int":
    return _checks.integer(name, x)
  return x.astype(jnp.float32)


def _compact(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``[B, L]`` mask -> ``[B, k]`` positions of the first ``k`` counted entries (in order), and counts ``[B]``."""
  order = jnp.argsort(jnp.where(mask > 0, 0, 1), axis=-1, stable=True)
  return order[:, :k], jnp.sum(mask > 0, axis=-1)


def _sorted_probs(logits: jax.Array, temperature: float, width: int) -> jax.Array:
  p = jax.nn.softmax(logits / temperature, axis=-1)
  p = -jnp.sort(-p, axis=-1)
  return jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])])


def _reduce(values: jax.Array, counted: jax.Array, weights: jax.Array | None) -> jax.Array:
  """``[B, n]`` values and 0/1 ``counted`` -> ``[B]``: the mean over counted entries, or the weighted sum."""
  if weights is not None:
    return jnp.sum(jnp.where(counted > 0, weights * values, 0.0), axis=-1)
  n = jnp.sum(counted, axis=-1)
  return jnp.where(n > 0, jnp.sum(jnp.where(counted > 0, values, 0.0), axis=-1) / jnp.maximum(n, 1), 0.0)


def uld(s_logits: jax.Array, t_logits: jax.Array, s_mask: jax.Array, t_mask: jax.Array, *,
        temperature: float = 1.0, weights: jax.Array | None = None) -> jax.Array:
  """Universal Logit Distillation: W1 between sorted probability vectors, positions paired by rank.

  Args:
    s_logits: ``[B, L_s, V_s]`` student logits.
    t_logits: ``[B, L_t, V_t]`` teacher logits (its own tokenization of the same text).
    s_mask: ``[B, L_s]`` 1 on the student's counted positions (the completion's targets).
    t_mask: ``[B, L_t]`` 1 on the teacher's counted positions.
    temperature: softening temperature, > 0.
    weights: optional ``[B, L_s]`` per-student-position weights replacing the mean over pairs.

  Returns:
    ``[B]``: the mean over the ``min(n_s, n_t)`` pairs of ``sum_j |sort(p_s)_j - sort(p_t)_j|``
    (module doc); 0 for a sequence without pairs.
  """
  s, t = _logit_pair(s_logits, t_logits, temperature)
  (b, ls, vs), (_, lt, vt) = s.shape, t.shape
  s_mask = _per_position("s_mask", s_mask, (b, ls), "float")
  t_mask = _per_position("t_mask", t_mask, (b, lt), "float")
  k = min(ls, lt)
  s_pos, n_s = _compact(s_mask, k)
  t_pos, n_t = _compact(t_mask, k)
  paired = (jnp.arange(k)[None, :] < jnp.minimum(n_s, n_t)[:, None]).astype(jnp.float32)
  width = max(vs, vt)
  # Only the k paired positions are sorted: [B, k, V] rather than both full [B, L, V].
  ps = _sorted_probs(jnp.take_along_axis(s, s_pos[..., None], axis=1), temperature, width)
  pt = _sorted_probs(jnp.take_along_axis(t, t_pos[..., None], axis=1), temperature, width)
  dist = jnp.sum(jnp.abs(ps - pt), axis=-1)
  if weights is not None:
    weights = jnp.take_along_axis(_per_position("weights", weights, (b, ls), "float"), s_pos, axis=1)
  return _reduce(dist, paired, weights)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """``[B, L, V]`` logits, ``[B, L]`` targets -> ``[B, L]`` ``log softmax(logits / T)[target]`` (float32)."""
  logits = _logits("logits", logits)
  targets = _per_position("targets", targets, logits.shape[:2], "int")
  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
  return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def chunk_logprobs(token_lp: jax.Array, chunks: jax.Array, num_chunks: int) -> tuple[jax.Array, jax.Array]:
  """Per-chunk sums of token log-probabilities.

  Args:
    token_lp: ``[B, L]`` token log-probabilities.
    chunks: int ``[B, L]`` chunk id of each position (``0 .. num_chunks - 1``), -1 outside every chunk.
    num_chunks: the static number of chunk slots.

  Returns:
    ``([B, num_chunks] log-probabilities, [B, num_chunks] token counts)``.
  """
  seg = jnp.where(chunks >= 0, chunks, num_chunks).astype(jnp.int32)

  def row(values, ids):
    return jax.ops.segment_sum(values, ids, num_segments=num_chunks + 1)[:num_chunks]

  sums = jax.vmap(row)(token_lp, seg)
  counts = jax.vmap(row)(jnp.ones_like(token_lp), seg)
  return sums, counts


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends."""
  return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _below_one(log_p: jax.Array) -> jax.Array:
  # Straight-through clamp: the value is kept below -_EPS, the gradient passes as if unclamped, so a
  # student sure of a chunk the teacher doubts is still pushed down.
  return log_p + jax.lax.stop_gradient(jnp.minimum(log_p, -_EPS) - log_p)


def binary_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``KL(Bernoulli(p) || Bernoulli(q))`` from ``log p``, ``log q`` (each <= 0), elementwise."""
  log_p, log_q = _below_one(log_p), _below_one(log_q)
  p = jnp.exp(log_p)
  return p * (log_p - log_q) + (-jnp.expm1(log_p)) * (_log1mexp(log_p) - _log1mexp(log_q))


def aligned_kd(s_logits: jax.Array, s_targets: jax.Array, s_chunks: jax.Array, t_logits: jax.Array,
               t_targets: jax.Array, t_chunks: jax.Array, *, temperature: float = 1.0,
               weights: jax.Array | None = None) -> jax.Array:
  """Chunk likelihood matching across tokenizers: the binary KL of each aligned chunk's probability.

  Args:
    s_logits: ``[B, L_s, V_s]`` student logits; ``s_targets`` ``[B, L_s]`` the tokens they predict.
    s_chunks: int ``[B, L_s]`` chunk id of each student target (-1: in no chunk).
    t_logits: ``[B, L_t, V_t]`` teacher logits; ``t_targets`` ``[B, L_t]`` its targets.
    t_chunks: int ``[B, L_t]`` chunk id of each teacher target, the same ids as the student's for
      the same text (:func:`kdlab.data.alignment.align`); ids below ``min(L_s, L_t)``.
    temperature: token distributions are ``softmax(logits / T)``, > 0.
    weights: optional ``[B, L_s]`` per-student-position weights replacing the per-sequence mean.

  Returns:
    ``[B]``: ``sum_c D_c / sum_c |c|_s`` over the chunks present on both sides (module doc); 0 for a
    sequence without chunks.
  """
  s, t = _logit_pair(s_logits, t_logits, temperature)
  (b, ls, _), (_, lt, _) = s.shape, t.shape
  s_chunks = _per_position("s_chunks", s_chunks, (b, ls), "int")
  t_chunks = _per_position("t_chunks", t_chunks, (b, lt), "int")
  num = min(ls, lt)  # every chunk holds at least one token on each side
  s_lp, s_count = chunk_logprobs(token_logprobs(s, s_targets, temperature), s_chunks, num)
  t_lp, t_count = chunk_logprobs(token_logprobs(t, t_targets, temperature), t_chunks, num)
  both = (s_count > 0) & (t_count > 0)
  div = jnp.where(both, binary_kl(t_lp, s_lp), 0.0)
  # Each chunk's divergence shared evenly by its student tokens: [B, L_s] per-position values.
  share = jnp.where(both, div / jnp.maximum(s_count, 1), 0.0)
  in_chunk = (s_chunks >= 0) & (s_chunks < num)
  safe = jnp.clip(s_chunks, 0, num - 1)
  values = jnp.take_along_axis(share, safe, axis=1)
  counted = (in_chunk & jnp.take_along_axis(both, safe, axis=1)).astype(jnp.float32)
  if weights is not None:
    weights = _per_position("weights", weights, (b, ls), "float")
  return _reduce(values, counted, weights)
