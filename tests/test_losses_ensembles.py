"""Tests for kdlab.losses.ensembles.combine_teachers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdlab.losses import ensembles as E
from kdlab.losses import logits as L

# These programs are tiny: at XLA's default optimisation level compiling them costs far more than
# running them (and eager op-by-op dispatch compiles every primitive), so tests jit with cheap
# compiler settings. The numerics being checked do not depend on them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

NT, B, C = 3, 4, 5
_rng = np.random.default_rng(4)
LOGITS = (2 * _rng.normal(size=(NT, B, C))).astype(np.float32)
LABELS = np.array([0, 2, 4, 1], np.int32)
W = np.array([1.0, 3.0, 0.0], np.float32)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_mixture(logits, method, temp, weights=None, labels=None):
  """The combined teacher distribution at temperature ``temp`` ([..., C] probabilities)."""
  logits = np.asarray(logits, np.float64)
  p = np_softmax(logits / temp)
  if method == "mean_probs":
    return p.mean(0)
  if method == "mean_logits":
    return np_softmax(logits.mean(0) / temp)
  if method == "weighted":
    w = weights / weights.sum()
    return np.einsum("n,n...c->...c", w, p)
  # confidence: softmax over teachers of -CE(teacher at T=1, label)
  log_p1 = np.log(np_softmax(logits))
  ce = -np.take_along_axis(log_p1, np.broadcast_to(labels[None, ..., None], log_p1.shape[:-1] + (1,)), -1)
  w = np_softmax(-ce[..., 0].swapaxes(0, -1)).swapaxes(0, -1)
  return (w[..., None] * p).sum(0)


CASES = {
    "mean_probs": dict(),
    "mean_logits": dict(),
    "weighted": dict(weights=W),
    "confidence": dict(labels=LABELS),
}


def _combine(logits, method, temp, **kw):
  return E.combine_teachers(logits, method=method, temperature=temp, **kw)


COMBINE = jit(_combine, static_argnames=("method", "temp"))


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_matches_numpy_and_feeds_kd(method, temp):
  kw = CASES[method]
  out = COMBINE(LOGITS, method, temp, **kw)
  assert out.shape == (B, C) and out.dtype == jnp.float32
  mix = np_mixture(LOGITS, method, temp, **{k: np.asarray(v) for k, v in kw.items()})
  # The convention: softmax(out / T) is the combined distribution at temperature T ...
  np.testing.assert_allclose(np_softmax(np.asarray(out, np.float64) / temp), mix, rtol=1e-5, atol=1e-7)
  if method != "mean_logits":
    # ... i.e. out = T * log(mixture); at T = 1 these are log-probabilities.
    np.testing.assert_allclose(out, temp * np.log(mix), rtol=1e-5, atol=1e-5)
  # so kd at the same T is T^2 KL(mixture || p_s).
  s = LOGITS[0] + 1.0
  log_ps = np.log(np_softmax(np.asarray(s, np.float64) / temp))
  expected = temp**2 * (mix * (np.log(mix) - log_ps)).sum(-1)
  np.testing.assert_allclose(L.kd(s, out, temperature=temp), expected, rtol=1e-4)


@pytest.mark.parametrize("method", list(CASES))
def test_batched_grads_extreme_and_bfloat16(method):
  kw = CASES[method]
  # Extra batch axis: [teachers, 2, B, C] equals combining each slice.
  l2 = np.stack([LOGITS, LOGITS[:, ::-1]], axis=1)
  kw2 = dict(kw, labels=np.stack([LABELS, LABELS[::-1]])) if "labels" in kw else kw
  out2 = COMBINE(l2, method, 4.0, **kw2)
  np.testing.assert_allclose(out2[1], COMBINE(LOGITS[:, ::-1], method, 4.0, **(
      dict(kw, labels=LABELS[::-1]) if "labels" in kw else kw)), rtol=1e-5, atol=1e-6)
  # sin: a non-linear read-out, so the check is not blind to errors along the softmax's flat direction.
  loss = jit(lambda l: jnp.sum(jnp.sin(_combine(l, method, 4.0, **kw))))
  check_grads(loss, (jnp.asarray(LOGITS),), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
  value_and_grad = jax.value_and_grad(loss)
  for logits in (1e4 * np.sign(LOGITS), jnp.asarray(LOGITS, jnp.bfloat16)):
    value, grad = value_and_grad(logits)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_single_teacher_is_identity_and_equal_teachers_collapse():
  one = COMBINE(LOGITS[:1], "mean_probs", 1.0)
  np.testing.assert_allclose(one, jax.nn.log_softmax(LOGITS[0]), rtol=1e-5, atol=1e-6)
  same = np.stack([LOGITS[0]] * NT)
  for method, kw in CASES.items():
    out = COMBINE(same, method, 3.0, **kw)
    np.testing.assert_allclose(L.kd(LOGITS[0], out, temperature=3.0), 0.0, atol=1e-5)


def test_confidence_prefers_the_correct_teacher():
  good = 10.0 * np.eye(C, dtype=np.float32)[LABELS]
  bad = 10.0 * np.eye(C, dtype=np.float32)[(LABELS + 1) % C]
  out = COMBINE(np.stack([bad, good]), "confidence", 1.0, labels=LABELS)
  assert np.all(np.argmax(out, -1) == LABELS)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="median"), ValueError, "method must be one of"),
    (dict(method="mean_probs", temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(method="weighted"), ValueError, "weights: required"),
    (dict(method="weighted", weights=W[:2]), ValueError, "weights: expected shape"),
    (dict(method="weighted", weights=-W), ValueError, "weights must be non-negative"),
    (dict(method="weighted", weights=0 * W), ValueError, "weights must be non-negative with a positive sum"),
    (dict(method="mean_probs", weights=W), ValueError, "weights: only used by method='weighted'"),
    (dict(method="confidence"), ValueError, "labels: required"),
    (dict(method="confidence", labels=LABELS[:2]), ValueError, "labels: expected shape"),
    (dict(method="confidence", labels=LABELS.astype(np.float32)), TypeError, "labels: expected an integer"),
    (dict(method="mean_logits", labels=LABELS), ValueError, "labels: only used by method='confidence'"),
    (dict(method="mean_probs", logits=LOGITS.astype(np.int32)), TypeError, "logits: expected a floating"),
    (dict(method="mean_probs", logits=LOGITS[0, 0]), ValueError, "logits: expected at least 2"),
])
def test_errors_name_the_argument(kwargs, exc, match):
  logits = kwargs.pop("logits", LOGITS)
  with pytest.raises(exc, match=match):
    jax.eval_shape(lambda: E.combine_teachers(logits, **kwargs))
