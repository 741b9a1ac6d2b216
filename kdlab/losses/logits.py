"""Losses between student and teacher logits (and the plain task loss).

Shapes: ``s`` and ``t`` are ``[..., C]`` logits; results are ``[...]`` (the
class axis reduced, batch axes kept). Computed in float32 whatever the input
dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdlab.losses import _checks


def ce(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
       where: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  Args:
    logits: ``[..., C]`` floating logits.
    labels: ``[...]`` integer class ids in ``[0, C)``.
    label_smoothing: mass spread uniformly over all classes, in ``[0, 1)``.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses: ``-sum_c q_c log softmax(logits)_c`` with
    ``q = (1 - label_smoothing) * onehot(labels) + label_smoothing / C``.

  Example:
    >>> ce(jnp.array([[2.0, 0.0]]), jnp.array([0]))  # ~[0.127]
  """
  logits = _checks.floating("logits", logits)
  labels = _checks.integer("labels", labels)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels: expected shape {logits.shape[:-1]} (logits without the class axis), "
                     f"got {labels.shape}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
  return _checks.apply_where(nll, where)


def kd(s: jax.Array, t: jax.Array, *, temperature: float = 1.0,
       where: jax.Array | None = None) -> jax.Array:
  """Hinton knowledge distillation: ``T^2 * KL(p_t || p_s)`` at temperature T.

  ``p = softmax(logits / T)``. The ``T^2`` factor keeps gradient magnitudes
  comparable across temperatures (Hinton, Vinyals & Dean 2015, "Distilling the
  Knowledge in a Neural Network", section 2).

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits (treated as a fixed target; wrap in
      ``stop_gradient`` upstream if it is a traced model output).
    temperature: softening temperature, > 0.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s = _checks.floating("s", s)
  t = _checks.floating("t", t)
  _checks.same_shape("s", s, "t", t)
  _checks.min_rank("s", s, 1)
  _checks.positive("temperature", temperature)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return _checks.apply_where(temperature**2 * kl, where)


def _pair(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Validates a (student, teacher) pair of ``[..., C]`` logits; returns float32 copies."""
  s = _checks.floating("s", s)
  t = _checks.floating("t", t)
  _checks.same_shape("s", s, "t", t)
  _checks.min_rank("s", s, 1)
  return s, t


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``KL(p || q)`` over the last axis from log-probabilities (``0 log 0 = 0``)."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def reverse_kl(s: jax.Array, t: jax.Array, *, temperature: float = 1.0,
               where: jax.Array | None = None) -> jax.Array:
  """Reverse (mode-seeking) KL: ``T^2 * KL(p_s || p_t)``, ``p = softmax(logits / T)``.

  The student is penalised for mass where the teacher has little, so it
  concentrates on the teacher's main modes (used e.g. by MiniLLM, Gu et al.
  2024, "MiniLLM: Knowledge Distillation of Large Language Models").

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits (a fixed target).
    temperature: softening temperature, > 0.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses, >= 0, zero where ``s == t``.

  Example:
    >>> reverse_kl(jnp.array([[2.0, 0.0]]), jnp.array([[0.0, 0.0]]))  # ~[0.328]
  """
  s, t = _pair(s, t)
  _checks.positive("temperature", temperature)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  return _checks.apply_where(temperature**2 * _kl(log_ps, log_pt), where)


def jsd(s: jax.Array, t: jax.Array, *, beta: float = 0.5, temperature: float = 1.0,
        where: jax.Array | None = None) -> jax.Array:
  """Generalized Jensen-Shannon divergence (GKD).

  ``T^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)]`` with the mixture
  ``m = beta * p_t + (1 - beta) * p_s``; ``beta = 0.5`` is the symmetric JSD,
  bounded by ``T^2 log 2``. ``log m`` is a two-term logsumexp of log-probs, so
  it stays finite for extreme logits. Agarwal et al. 2024, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes".

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits (a fixed target).
    beta: mixture weight of the teacher, in ``(0, 1)``.
    temperature: softening temperature, > 0.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s, t = _pair(s, t)
  _checks.open_unit("beta", beta)
  _checks.positive("temperature", temperature)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  log_m = jnp.logaddexp(jnp.log(beta) + log_pt, jnp.log1p(-beta) + log_ps)
  loss = beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)
  return _checks.apply_where(temperature**2 * loss, where)


def tvd(s: jax.Array, t: jax.Array, *, temperature: float = 1.0,
        where: jax.Array | None = None) -> jax.Array:
  """Total variation distance ``0.5 * sum_c |p_t - p_s|`` at temperature T.

  Bounded in ``[0, 1]``; no ``T^2`` factor (it is a distance between
  distributions, not a KL gradient-matching term). Used as a distillation
  divergence by Wen et al. 2023, "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation".

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits.
    temperature: softening temperature, > 0.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example distances in ``[0, 1]``.
  """
  s, t = _pair(s, t)
  _checks.positive("temperature", temperature)
  p_s = jax.nn.softmax(s / temperature, axis=-1)
  p_t = jax.nn.softmax(t / temperature, axis=-1)
  return _checks.apply_where(0.5 * jnp.sum(jnp.abs(p_t - p_s), axis=-1), where)


def dkd(s: jax.Array, t: jax.Array, labels: jax.Array, *, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, where: jax.Array | None = None) -> jax.Array:
  """Decoupled knowledge distillation: ``alpha * TCKD + beta * NCKD``.

  With ``p = softmax(logits / T)`` and ``g`` the label class:

  * TCKD (target class): ``T^2 * KL(b_t || b_s)`` between the binary
    distributions ``b = [p_g, 1 - p_g]``.
  * NCKD (non-target classes): ``T^2 * KL(q_t || q_s)`` where ``q`` is the
    softmax over the non-target classes only (the label logit is masked out
    before the softmax, as mdistiller does).

  Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR). ``log(1 - p_g)``
  is a logsumexp over the non-target logits, so both terms stay finite for
  extreme logits.

  Args:
    s: ``[..., C]`` student logits, ``C >= 2``.
    t: ``[..., C]`` teacher logits.
    labels: ``[...]`` integer ground-truth class ids.
    alpha: weight of TCKD.
    beta: weight of NCKD.
    temperature: softening temperature, > 0.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses, >= 0 for non-negative weights, zero where
    ``s == t``. Their batch mean equals mdistiller's ``dkd_loss``.
  """
  s, t = _pair(s, t)
  labels = _checks.integer("labels", labels)
  if labels.shape != s.shape[:-1]:
    raise ValueError(f"labels: expected shape {s.shape[:-1]} (logits without the class axis), "
                     f"got {labels.shape}")
  if s.shape[-1] < 2:
    raise ValueError(f"s: dkd needs at least 2 classes, got shape {s.shape}")
  _checks.positive("temperature", temperature)
  gt = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)

  def parts(logits):
    z = logits / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    # Large finite negative rather than -inf: keeps 0 * (log q - log q') at 0, not NaN.
    z_other = jnp.where(gt, -1e30, z)
    lse_other = jax.nn.logsumexp(z_other, axis=-1)
    log_gt = jnp.sum(jnp.where(gt, z, 0.0), axis=-1) - lse
    log_binary = jnp.stack([log_gt, lse_other - lse], axis=-1)
    log_nontarget = z_other - lse_other[..., None]
    return log_binary, log_nontarget

  log_bs, log_qs = parts(s)
  log_bt, log_qt = parts(t)
  tckd = _kl(log_bt, log_bs)
  nckd = jnp.sum(jnp.where(gt, 0.0, jnp.exp(log_qt) * (log_qt - log_qs)), axis=-1)
  loss = temperature**2 * (alpha * tckd + beta * nckd)
  return _checks.apply_where(loss, where)


def logit_l2(s: jax.Array, t: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
  """Logit matching: ``mean_c (s_c - t_c)^2``.

  Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?" (NeurIPS).

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s, t = _pair(s, t)
  return _checks.apply_where(jnp.mean(jnp.square(s - t), axis=-1), where)


def hard_ce(s: jax.Array, t: jax.Array, *, label_smoothing: float = 0.0,
            where: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of the student against the teacher's argmax (hard pseudo-labels).

  ``ce(s, argmax(t))``; no gradient flows into ``t``. Ties in ``t`` go to the
  lowest class id.

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits.
    label_smoothing: as in :func:`ce`, in ``[0, 1)``.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` per-example losses.
  """
  s, t = _pair(s, t)
  return ce(s, jnp.argmax(t, axis=-1), label_smoothing=label_smoothing, where=where)


def top_k_agreement(s: jax.Array, t: jax.Array, *, k: int = 1,
                    where: jax.Array | None = None) -> jax.Array:
  """Whether the teacher's top-1 class is among the student's top-k (a metric).

  Args:
    s: ``[..., C]`` student logits.
    t: ``[..., C]`` teacher logits.
    k: how many student classes count, ``1 <= k <= C``.
    where: optional ``[...]`` boolean mask; masked entries give 0.

  Returns:
    ``[...]`` float32, 1.0 where ``argmax(t)`` is in ``top_k(s)`` else 0.0
    (no gradient). Ties go to the lowest class id on both sides.

  Example:
    >>> top_k_agreement(jnp.array([[3.0, 2.0, 1.0]]), jnp.array([[0.0, 1.0, 0.0]]), k=2)  # [1.]
  """
  s, t = _pair(s, t)
  _checks.positive_int("k", k)
  if k > s.shape[-1]:
    raise ValueError(f"k must be <= the number of classes {s.shape[-1]}, got {k}")
  _, top = jax.lax.top_k(jax.lax.stop_gradient(s), k)
  hit = jnp.any(top == jnp.argmax(t, axis=-1)[..., None], axis=-1)
  return _checks.apply_where(hit.astype(jnp.float32), where)
