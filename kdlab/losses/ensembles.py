"""Combining several teachers' logits into one target for a logit loss.

Convention (one for every method): the result is a *logit vector at the same
temperature*, i.e. ``softmax(combined / T)`` is the combined teacher
distribution at temperature ``T``. Pass the same ``temperature`` to the
consuming loss, e.g.::

  target = combine_teachers(teacher_logits, method="mean_probs", temperature=4.0)
  loss = kd(student_logits, target, temperature=4.0)

so the student is softened with the same ``T`` and ``kd``'s ``T^2`` scaling
applies unchanged. For the probability-mixing methods the result is
``T * log(p_mix)``: at ``T = 1`` exactly the log-probabilities of the mixture
(a log-probability vector is a valid logit vector: ``softmax(log p) = p``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdlab.losses import _checks

METHODS = ("mean_probs", "mean_logits", "weighted", "confidence")


def combine_teachers(logits: jax.Array, *, method: str, temperature: float = 1.0,
                     weights: jax.Array | None = None,
                     labels: jax.Array | None = None) -> jax.Array:
  """Combines ``[num_teachers, ..., C]`` teacher logits into one ``[..., C]`` target.

  Methods (``p_i = softmax(logits_i / T)``):

  * ``"mean_probs"``: ``T * log(mean_i p_i)`` (average of the softened
    distributions; You et al. 2017, "Learning from Multiple Teacher Networks").
  * ``"mean_logits"``: ``mean_i logits_i`` (temperature plays no part here;
    the consumer applies it).
  * ``"weighted"``: ``T * log(sum_i w_i p_i)`` with fixed ``weights``
    ``[num_teachers]``, non-negative, normalised to sum 1.
  * ``"confidence"``: ``T * log(sum_i w_i p_i)`` with per-example weights
    ``w = softmax_i(-CE(logits_i, labels))`` (the teachers' cross-entropy on
    the true label at temperature 1): confident, correct teachers count more.
    Related to CA-MKD (Zhang et al. 2022, "Confidence-Aware Multi-Teacher
    Knowledge Distillation"), whose weights are ``(1 - softmax_i(CE_i)) / (K - 1)``.

  The mixtures are computed as logsumexp over teachers of ``log w_i +
  log p_i``, so they stay finite for extreme logits. No gradient is stopped:
  wrap teacher outputs in ``stop_gradient`` upstream as usual.

  Args:
    logits: ``[num_teachers, ..., C]`` floating teacher logits.
    method: one of ``"mean_probs"``, ``"mean_logits"``, ``"weighted"``, ``"confidence"``.
    temperature: > 0; pass the same value to the consuming loss.
    weights: ``[num_teachers]`` (``"weighted"`` only).
    labels: ``[...]`` integer labels (``"confidence"`` only).

  Returns:
    ``[..., C]`` logits at temperature ``T`` (see the module docstring).
  """
  logits = _checks.floating("logits", logits)
  _checks.min_rank("logits", logits, 2)
  _checks.positive("temperature", temperature)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if weights is not None and method != "weighted":
    raise ValueError(f"weights: only used by method='weighted', got method={method!r}")
  if labels is not None and method != "confidence":
    raise ValueError(f"labels: only used by method='confidence', got method={method!r}")
  num_teachers = logits.shape[0]

  if method == "mean_logits":
    return jnp.mean(logits, axis=0)

  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
  if method == "mean_probs":
    w = jnp.full((num_teachers,), 1.0 / num_teachers)
  elif method == "weighted":
    if weights is None:
      raise ValueError("weights: required for method='weighted'")
    w = jnp.asarray(weights, jnp.float32)  # ints are fine for fixed weights
    if w.shape != (num_teachers,):
      raise ValueError(f"weights: expected shape {(num_teachers,)} (one per teacher), got {w.shape}")
    try:
      concrete = np.asarray(weights, np.float64)
    except jax.errors.TracerArrayConversionError:  # scheduled/traced weights: trust them
      concrete = None
    if concrete is not None and (np.any(concrete < 0) or not concrete.sum() > 0):
      raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    w = w / jnp.sum(w)
  else:  # confidence
    if labels is None:
      raise ValueError("labels: required for method='confidence'")
    labels = _checks.integer("labels", labels)
    if labels.shape != logits.shape[1:-1]:
      raise ValueError(f"labels: expected shape {logits.shape[1:-1]} (logits without the teacher "
                       f"and class axes), got {labels.shape}")
    log_p1 = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_p1, jnp.broadcast_to(labels[None, ..., None],
                                                       (num_teachers, *labels.shape, 1)), axis=-1)
    w = jax.nn.softmax(-ce, axis=0)  # [num_teachers, ..., 1]
  w = jnp.reshape(w, w.shape + (1,) * (log_p.ndim - w.ndim))
  return temperature * jax.nn.logsumexp(log_p, axis=0, b=w)
