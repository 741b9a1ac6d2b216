"""Tests for kdlab.losses.attention against independent numpy formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdlab.losses import attention as A

# These programs are tiny: at XLA's default optimisation level compiling them costs far more than
# running them (and eager op-by-op dispatch compiles every primitive), so tests jit with cheap
# compiler settings. The numerics being checked do not depend on them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

B, HEADS, Q = 4, 2, 3
_rng = np.random.default_rng(2)


def _r(*shape):
  return _rng.normal(size=shape).astype(np.float32)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


SF, TF = _r(B, 4, 4, 3), _r(B, 4, 4, 5)
SP, TP = np_softmax(_r(B, HEADS, Q, Q)).astype(np.float32), np_softmax(_r(B, HEADS, Q, Q)).astype(np.float32)
SVAL, TVAL = _r(B, HEADS, Q, 4), _r(B, HEADS, Q, 6)
WHERE = np.array([True, False, True, True])
QMASK = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], bool)


def np_at(s, t, p):
  def amap(f):
    a = (np.abs(np.asarray(f, np.float64))**p).mean(-1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  return ((amap(s) - amap(t))**2).mean(1)


def np_kl_per_query(s, t):  # [B, heads, q, k] probabilities -> [B, q]
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(np.where(t > 0, s, 1))), 0)
  return terms.sum(-1).mean(1)


def np_relation(v):
  v = np.asarray(v, np.float64)
  return np_softmax(np.einsum("bhid,bhjd->bhij", v, v) / np.sqrt(v.shape[-1]))


CASES = {
    "at": (lambda s, t, **kw: A.at(s, t, p=2, **kw), lambda s, t: np_at(s, t, 2), (SF, TF)),
    "at_p1": (lambda s, t, **kw: A.at(s, t, p=1, **kw), lambda s, t: np_at(s, t, 1), (SF, TF)),
    "attention_kl": (A.attention_kl, lambda s, t: np_kl_per_query(s, t).mean(1), (SP, TP)),
    "value_relation": (A.value_relation,
                       lambda s, t: np_kl_per_query(np_relation(s), np_relation(t)).mean(1), (SVAL, TVAL)),
}
NAMES = list(CASES)
JIT = {name: jit(case[0]) for name, case in CASES.items()}


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_jit_and_vmap(name):
  _, ref, (s, t) = CASES[name]
  out = JIT[name](s, t)
  assert out.shape == (B,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(s, t), rtol=1e-4, atol=1e-6)
  s2, t2 = np.stack([s, s[::-1]]), np.stack([t, t[::-1]])
  np.testing.assert_allclose(jit(jax.vmap(CASES[name][0]))(s2, t2)[1], ref(s[::-1], t[::-1]),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_grads(name):
  fn, _, (s, t) = CASES[name]
  check_grads(jax.jit(lambda s: jnp.sum(fn(s, t))), (jnp.asarray(s),), order=1, modes=["rev"],
              eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_where_equals_slicing_zero_at_equality(name):
  _, _, (s, t) = CASES[name]
  fn = JIT[name]
  out = fn(s, t, where=WHERE)
  np.testing.assert_allclose(out[WHERE], fn(s[WHERE], t[WHERE]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(out[~WHERE], 0.0)
  np.testing.assert_allclose(fn(t, t), 0.0, atol=1e-6)
  assert np.all(np.asarray(out) >= 0)


@pytest.mark.parametrize("name, s, t", [("attention_kl", SP, TP), ("value_relation", SVAL, TVAL)])
def test_query_position_mask(name, s, t):
  ref = CASES[name][1]
  per_query = (np_kl_per_query(s, t) if name == "attention_kl"
               else np_kl_per_query(np_relation(s), np_relation(t)))
  expected = np.where(QMASK.any(1), (per_query * QMASK).sum(1) / np.maximum(QMASK.sum(1), 1), 0.0)
  np.testing.assert_allclose(JIT[name](s, t, where=QMASK), expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(JIT[name](s, t, where=np.ones_like(QMASK)), ref(s, t), rtol=1e-5)
  with pytest.raises(ValueError, match=r"where: expected shape \(4,\) \(examples\) or \(4, 3\)"):
    JIT[name](s, t, where=QMASK[:, :2])


def test_attention_kl_with_zero_probabilities():
  # Causal attention: zeros above the diagonal in both student and teacher.
  causal = np.tril(np.ones((Q, Q), bool))
  def causal_probs(x):
    e = np.where(causal, np.exp(x), 0.0)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)
  s, t = causal_probs(_r(B, HEADS, Q, Q)), causal_probs(_r(B, HEADS, Q, Q))
  loss, grad = jit(jax.value_and_grad(lambda s: jnp.sum(A.attention_kl(s, t))))(s)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, np_kl_per_query(s, t).mean(1).sum(), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_and_bfloat16_inputs(name):
  fn, _, (s, t) = CASES[name]
  value_and_grad = jit(jax.value_and_grad(lambda s, t: jnp.sum(fn(s, t))))
  if name == "attention_kl":  # probabilities from extreme logits: exact zeros and ones
    big_s = np_softmax(1e4 * np.sign(_r(B, HEADS, Q, Q))).astype(np.float32)
    big_t = np_softmax(1e4 * np.sign(_r(B, HEADS, Q, Q))).astype(np.float32)
  else:
    big_s, big_t = 1e4 * np.sign(s), -1e4 * np.sign(t)
  loss, grad = value_and_grad(big_s, big_t)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  loss, grad = value_and_grad(sb, tb)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, jnp.sum(JIT[name](sb.astype(jnp.float32), tb.astype(jnp.float32))),
                             rtol=1e-5)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: A.at(SF, TF[:, :2]), ValueError, "s_feat and t_feat must have the same batch and spatial"),
    (lambda: A.at(SF, TF, p=0), ValueError, "p must be > 0, got 0"),
    (lambda: A.at(SF.astype(np.int32), TF), TypeError, "s_feat: expected a floating"),
    (lambda: A.attention_kl(SP, TP[:, :1]), ValueError, "s_probs and t_probs must have the same shape"),
    (lambda: A.attention_kl(SP, TP.astype(np.int32)), TypeError, "t_probs: expected a floating"),
    (lambda: A.value_relation(SVAL, TVAL[:, :1]), ValueError, "s_values and t_values must agree"),
    (lambda: A.value_relation(SVAL.astype(np.int32), TVAL), TypeError, "s_values: expected a floating"),
])
def test_errors_name_the_argument(call, exc, match):
  with pytest.raises(exc, match=match):
    jax.eval_shape(call)  # inputs are validated while tracing: nothing to compute
