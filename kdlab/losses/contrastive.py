"""Contrastive distillation: CRD (with its memory bank) and in-batch InfoNCE.

Embeddings are ``[B, dim]``, already projected (the embedding heads are
connectors in ``kdlab.models.connectors``); they are L2-normalised here again
defensively. Losses are per anchor ``[B]``, their mean the paper's batch loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdlab.losses import _checks
from kdlab.losses.features import l2_normalize

_NCE_EPS = 1e-7  # RepDistiller's eps in the NCE posterior.


class CRDState(NamedTuple):
  """CRD memory bank (a pytree; carry it in the train state, never differentiate it).

  Attributes:
    memory_s: ``[N, dim]`` student embeddings, one row per training example
      (RepDistiller's ``memory_v1``).
    memory_t: ``[N, dim]`` teacher embeddings (``memory_v2``).
    z_s: scalar normaliser of the student-anchored scores (``Z_v1``); -1 = unset.
    z_t: scalar normaliser of the teacher-anchored scores (``Z_v2``); -1 = unset.
  """
  memory_s: jax.Array
  memory_t: jax.Array
  z_s: jax.Array
  z_t: jax.Array


def crd_init_state(num_examples: int, dim: int, key: jax.Array) -> CRDState:
  """Fresh memory bank: rows uniform in ``[-stdv, stdv]``, ``stdv = 1 / sqrt(dim / 3)``.

  Args:
    num_examples: ``N``, the training-set size (the ``indices`` range).
    dim: embedding size.
    key: PRNG key.
  """
  _checks.positive_int("num_examples", num_examples)
  _checks.positive_int("dim", dim)
  stdv = 1.0 / (dim / 3.0)**0.5
  k_s, k_t = jax.random.split(key)
  def bank(k):
    return jax.random.uniform(k, (num_examples, dim), jnp.float32, -stdv, stdv)
  # Two arrays, not one twice: the train step donates its state, and a buffer can be donated only once.
  return CRDState(bank(k_s), bank(k_t), jnp.array(-1.0, jnp.float32), jnp.array(-1.0, jnp.float32))


def _nce(scores: jax.Array, num_examples: int) -> jax.Array:
  """``[B, 1 + K]`` normalised scores (positive first) -> ``[B]`` NCE loss with ``Pn = 1 / N``."""
  m_pn = (scores.shape[-1] - 1) / num_examples
  log_d1 = jnp.log(scores[:, 0] / (scores[:, 0] + m_pn + _NCE_EPS))
  log_d0 = jnp.log(m_pn / (scores[:, 1:] + m_pn + _NCE_EPS))
  return -(log_d1 + jnp.sum(log_d0, axis=-1))


def crd(s_embed: jax.Array, t_embed: jax.Array, indices: jax.Array, state: CRDState, *,
        key: jax.Array, num_negatives: int, temperature: float = 0.07, momentum: float = 0.5,
        negative_indices: jax.Array | None = None) -> tuple[jax.Array, CRDState]:
  """Contrastive representation distillation with a memory bank (NCE form).

  For each anchor, ``1 + K`` bank rows are scored: the positive at
  ``indices`` and ``K = num_negatives`` negatives drawn uniformly from all
  ``N`` rows (RepDistiller's ``AliasMethod`` over uniform weights; the
  positive itself is not excluded). Scores are ``exp(<bank_row, v> / T) / Z``
  where ``Z = mean(exp(...)) * N`` is fixed on the first call (state
  ``z = -1``) and reused after. NCE loss with noise ``Pn = 1 / N``, summed over
  both directions (student anchor vs teacher bank, teacher anchor vs student
  bank). Then the bank rows at ``indices`` move to
  ``normalize(momentum * row + (1 - momentum) * embed)``. Tian et al. 2020,
  "Contrastive Representation Distillation" (ICLR).

  Args:
    s_embed: ``[B, dim]`` student embedding (after its head).
    t_embed: ``[B, dim]`` teacher embedding.
    indices: ``[B]`` integer dataset indices of the batch (positives), in ``[0, N)``.
    state: :class:`CRDState` from :func:`crd_init_state` or a previous call.
    key: PRNG key for the negatives.
    num_negatives: ``K`` (RepDistiller default 16384), a positive int.
    temperature: > 0 (``nce_t``).
    momentum: bank momentum in ``[0, 1)`` (``nce_m``).
    negative_indices: optional ``[B, K]`` integer indices to use instead of
      sampling (e.g. RepDistiller's class-exclusive ``contrast_idx`` from the
      data pipeline); ``key`` is then unused.

  Returns:
    ``(loss, new_state)``: ``loss`` ``[B]`` per-anchor values whose mean equals
    RepDistiller's ``CRDLoss``; ``new_state`` carries the updated banks and
    ``Z``. Gradients flow into the embeddings only.
  """
  s = _checks.floating("s_embed", s_embed)
  t = _checks.floating("t_embed", t_embed)
  _checks.same_shape("s_embed", s, "t_embed", t)
  _checks.rank("s_embed", s, 2)
  indices = _checks.integer("indices", indices)
  if indices.shape != s.shape[:1]:
    raise ValueError(f"indices: expected shape {s.shape[:1]} (one per example), got {indices.shape}")
  if not isinstance(state, CRDState):
    raise TypeError(f"state: expected a CRDState (see crd_init_state), got {type(state).__name__}")
  num_examples, dim = state.memory_s.shape
  if s.shape[1] != dim:
    raise ValueError(f"s_embed: embedding size {s.shape[1]} does not match the memory bank's {dim}")
  _checks.positive_int("num_negatives", num_negatives)
  _checks.positive("temperature", temperature)
  _checks.unit_interval("momentum", momentum)
  batch = s.shape[0]
  if negative_indices is None:
    negative_indices = jax.random.randint(key, (batch, num_negatives), 0, num_examples)
  else:
    negative_indices = _checks.integer("negative_indices", negative_indices)
    if negative_indices.shape != (batch, num_negatives):
      raise ValueError(f"negative_indices: expected shape {(batch, num_negatives)}, "
                       f"got {negative_indices.shape}")
  idx = jnp.concatenate([indices[:, None], negative_indices], axis=1)

  s = l2_normalize(s)
  t = l2_normalize(t)
  memory_s = jax.lax.stop_gradient(state.memory_s)
  memory_t = jax.lax.stop_gradient(state.memory_t)

  def scores(bank, anchor, z):
    out = jnp.exp(jnp.einsum("bkd,bd->bk", bank[idx], anchor) / temperature)
    z = jnp.where(z < 0, jax.lax.stop_gradient(jnp.mean(out)) * num_examples, z)
    return out / z, z

  out_s, z_s = scores(memory_t, s, state.z_s)  # student anchor vs teacher bank
  out_t, z_t = scores(memory_s, t, state.z_t)  # teacher anchor vs student bank
  loss = _nce(out_s, num_examples) + _nce(out_t, num_examples)

  def update(bank, embed):
    rows = momentum * bank[indices] + (1.0 - momentum) * jax.lax.stop_gradient(embed)
    return bank.at[indices].set(l2_normalize(rows))

  new_state = CRDState(update(memory_s, s), update(memory_t, t), z_s, z_t)
  return loss, new_state


def info_nce(s_embed: jax.Array, t_embed: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  """Symmetric in-batch InfoNCE between student and teacher embeddings.

  ``logits_ij = <s_i, t_j> / T`` on L2-normalised rows; the positive for
  anchor ``i`` is ``j = i``, the other rows of the batch are negatives. The
  loss is symmetric (CLIP style): ``0.5 * (CE(logits_i., i) + CE(logits_.i, i))``,
  student->teacher plus teacher->student. Oord et al. 2018, "Representation
  Learning with Contrastive Predictive Coding"; in-batch CRD variant as in
  Tian et al. 2020.

  Args:
    s_embed: ``[B, dim]`` student embeddings.
    t_embed: ``[B, dim]`` teacher embeddings.
    temperature: > 0.

  Returns:
    ``[B]`` per-anchor losses; their mean is the batch loss.
  """
  s = _checks.floating("s_embed", s_embed)
  t = _checks.floating("t_embed", t_embed)
  _checks.same_shape("s_embed", s, "t_embed", t)
  _checks.rank("s_embed", s, 2)
  _checks.positive("temperature", temperature)
  logits = l2_normalize(s) @ l2_normalize(t).T / temperature
  diag = jnp.diagonal(logits)
  row = jax.nn.logsumexp(logits, axis=1) - diag
  col = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (row + col)
