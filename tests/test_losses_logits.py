"""Tests for kdlab.losses.logits against independent numpy formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdlab.losses import logits as L

# These programs are tiny: at XLA's default optimisation level compiling them costs far more than
# running them (and eager op-by-op dispatch compiles every primitive), so tests jit with cheap
# compiler settings. The numerics being checked do not depend on them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

B, C = 4, 5
_rng = np.random.default_rng(0)
S = _rng.normal(size=(B, C)).astype(np.float32)
T = _rng.normal(size=(B, C)).astype(np.float32)
LABELS = np.array([0, 3, 1, 4], np.int32)
WHERE = np.array([True, False, True, True])


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_ce(s, labels, ls=0.0):
  q = (1 - ls) * np.eye(s.shape[-1])[labels] + ls / s.shape[-1]
  return -(q * np_log_softmax(s)).sum(-1)


def np_kd(s, t, temp):
  return temp**2 * np_kl(np_log_softmax(t / temp), np_log_softmax(s / temp))


def np_reverse_kl(s, t, temp):
  return temp**2 * np_kl(np_log_softmax(s / temp), np_log_softmax(t / temp))


def np_jsd(s, t, beta, temp):
  ps, pt = np.exp(np_log_softmax(s / temp)), np.exp(np_log_softmax(t / temp))
  m = beta * pt + (1 - beta) * ps
  return temp**2 * (beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1))


def np_tvd(s, t, temp):
  return 0.5 * np.abs(np.exp(np_log_softmax(t / temp)) - np.exp(np_log_softmax(s / temp))).sum(-1)


def np_dkd(s, t, labels, alpha, beta, temp):
  # mdistiller's recipe: binary [p_gt, p_rest], and the gt logit pushed down by 1000 for NCKD.
  gt = np.eye(s.shape[-1])[labels]
  def binary(x):
    p = np.exp(np_log_softmax(x / temp))
    return np.stack([(p * gt).sum(-1), (p * (1 - gt)).sum(-1)], -1)
  bs, bt = binary(s), binary(t)
  tckd = (bt * np.log(bt / bs)).sum(-1)
  pt2 = np.exp(np_log_softmax(t / temp - 1000.0 * gt))
  log_ps2 = np_log_softmax(s / temp - 1000.0 * gt)
  nckd = np.where(pt2 > 0, pt2 * (np.log(np.where(pt2 > 0, pt2, 1.0)) - log_ps2), 0.0).sum(-1)
  return temp**2 * (alpha * tckd + beta * nckd)


def np_top_k(s, t, k):
  top = np.argsort(-s, axis=-1, kind="stable")[..., :k]
  return (top == t.argmax(-1)[..., None]).any(-1).astype(np.float32)


# name -> (jax fn(s, t, y, **kw), numpy ref(s, t, y), is a divergence (>= 0, zero at s == t),
# differentiable); y are integer labels (used by dkd and ce only).
CASES = {
    "kd": (lambda s, t, y, **kw: L.kd(s, t, temperature=2.0, **kw),
           lambda s, t, y: np_kd(s, t, 2.0), True, True),
    "reverse_kl": (lambda s, t, y, **kw: L.reverse_kl(s, t, temperature=2.0, **kw),
                   lambda s, t, y: np_reverse_kl(s, t, 2.0), True, True),
    "jsd": (lambda s, t, y, **kw: L.jsd(s, t, beta=0.3, temperature=1.5, **kw),
            lambda s, t, y: np_jsd(s, t, 0.3, 1.5), True, True),
    "tvd": (lambda s, t, y, **kw: L.tvd(s, t, temperature=2.0, **kw),
            lambda s, t, y: np_tvd(s, t, 2.0), True, True),
    "dkd": (lambda s, t, y, **kw: L.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0, **kw),
            lambda s, t, y: np_dkd(s, t, y, 1.0, 8.0, 4.0), True, True),
    "logit_l2": (lambda s, t, y, **kw: L.logit_l2(s, t, **kw),
                 lambda s, t, y: ((s - t)**2).mean(-1), True, True),
    "hard_ce": (lambda s, t, y, **kw: L.hard_ce(s, t, label_smoothing=0.1, **kw),
                lambda s, t, y: np_ce(s, t.argmax(-1), 0.1), False, True),
    "top_k_agreement": (lambda s, t, y, **kw: L.top_k_agreement(s, t, k=2, **kw),
                        lambda s, t, y: np_top_k(s, t, 2), False, False),
    "ce": (lambda s, t, y, **kw: L.ce(s, y, label_smoothing=0.2, **kw),
           lambda s, t, y: np_ce(s, y, 0.2), False, True),
}
NAMES = list(CASES)
DIFFERENTIABLE = [n for n in NAMES if CASES[n][3]]
DIVERGENCES = [n for n in NAMES if CASES[n][2]]


def _program(fn):
  """Everything the per-function tests look at, as one jitted program (compiled once per dtype)."""
  def run(s, t, y):
    s2, t2, y2 = jnp.stack([s, t]), jnp.stack([t, s]), jnp.stack([y, y[::-1]])
    return dict(
        out=fn(s, t, y),
        masked=fn(s, t, y, where=WHERE),
        sliced=fn(s[WHERE], t[WHERE], y[WHERE]),
        equal=fn(s, s, y),
        batched=fn(s2, t2, y2),          # extra leading axis
        vmapped=jax.vmap(fn)(s2, t2, y2),  # the same problems, one per vmapped call
    )
  return jit(run)


def _value_and_grad(fn):
  def run(s, t, y):
    out, vjp = jax.vjp(lambda s: fn(s, t, y), s)
    return dict(out=out, grad=vjp(jnp.ones_like(out))[0])
  return jit(run)


PROGRAM = {name: _program(case[0]) for name, case in CASES.items()}
VALUE_AND_GRAD = {name: _value_and_grad(case[0]) for name, case in CASES.items()}


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_jit_batched_vmap(name):
  ref = CASES[name][1]
  res = PROGRAM[name](S, T, LABELS)
  assert res["out"].shape == (B,) and res["out"].dtype == jnp.float32
  np.testing.assert_allclose(res["out"], ref(S, T, LABELS), rtol=1e-4, atol=1e-5)
  expected = ref(np.stack([S, T]), np.stack([T, S]), np.stack([LABELS, LABELS[::-1]]))
  np.testing.assert_allclose(res["batched"], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(res["vmapped"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_grads(name):
  fn = CASES[name][0]
  check_grads(jax.jit(lambda s: jnp.sum(fn(s, T, LABELS))), (jnp.asarray(S),), order=1, modes=["rev"],
              eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_where_equals_slicing(name):
  res = PROGRAM[name](S, T, LABELS)
  np.testing.assert_allclose(res["masked"][WHERE], res["sliced"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(res["masked"][~WHERE], 0.0)
  with pytest.raises(ValueError, match="where"):
    jax.eval_shape(lambda: CASES[name][0](S, T, LABELS, where=WHERE[:2]))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_at_equality_and_non_negative(name):
  res = PROGRAM[name](S, T, LABELS)
  np.testing.assert_allclose(res["equal"], 0.0, atol=1e-6)
  assert np.all(np.asarray(res["out"]) >= 0.0)
  assert np.all(np.asarray(PROGRAM[name](10 * S, -3 * T, LABELS)["out"]) >= 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_finite(name):
  res = VALUE_AND_GRAD[name](1e4 * np.sign(S), -1e4 * np.sign(T), LABELS)
  assert np.all(np.isfinite(res["out"])) and np.all(np.isfinite(res["grad"]))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs(name):
  s, t = jnp.asarray(S, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16)
  res = VALUE_AND_GRAD[name](s, t, LABELS)
  # Computed in float32 on the bf16-rounded values; the gradient comes back in the input dtype.
  assert res["out"].dtype == jnp.float32
  f32 = VALUE_AND_GRAD[name](s.astype(jnp.float32), t.astype(jnp.float32), LABELS)
  np.testing.assert_allclose(res["out"], f32["out"], rtol=1e-6)
  assert res["grad"].dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(res["grad"], np.float32)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: L.kd(S, T[:, :4]), ValueError, "s and t must have the same shape"),
    (lambda: L.reverse_kl(S, T, temperature=0.0), ValueError, "temperature must be > 0, got 0"),
    (lambda: L.jsd(S, T, temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda: L.tvd(S, T, temperature=0), ValueError, "temperature must be > 0"),
    (lambda: L.jsd(S, T, beta=0.0), ValueError, r"beta must be in \(0, 1\)"),
    (lambda: L.jsd(S, T, beta=1.0), ValueError, r"beta must be in \(0, 1\)"),
    (lambda: L.kd(S.astype(np.int32), T), TypeError, "s: expected a floating array"),
    (lambda: L.logit_l2(S, T.astype(np.int32)), TypeError, "t: expected a floating array"),
    (lambda: L.dkd(S, T, LABELS.astype(np.float32)), TypeError, "labels: expected an integer"),
    (lambda: L.dkd(S, T, LABELS[:3]), ValueError, "labels: expected shape"),
    (lambda: L.dkd(S, T, LABELS, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: L.dkd(S[:, :1], T[:, :1], LABELS * 0), ValueError, "at least 2 classes"),
    (lambda: L.hard_ce(S, T, label_smoothing=1.0), ValueError, "label_smoothing"),
    (lambda: L.top_k_agreement(S, T, k=0), ValueError, "k must be > 0"),
    (lambda: L.top_k_agreement(S, T, k=C + 1), ValueError, "k must be <="),
    (lambda: L.top_k_agreement(S, T, k=1.0), TypeError, "k must be an int"),
    (lambda: L.ce(S, LABELS.astype(np.float32)), TypeError, "labels: expected an integer"),
])
def test_errors_name_the_argument(call, exc, match):
  with pytest.raises(exc, match=match):
    jax.eval_shape(call)  # inputs are validated while tracing: nothing to compute


def test_kd_gradient_scale_comparable_across_temperatures():
  # d/ds [T^2 KL] = T (p_s - p_t) ~ (s - t) / C for logits small relative to T, so with the T^2
  # factor the gradient norm barely moves from T=1 to T=20; without it, it would shrink ~T^2 = 400x.
  s, t = jnp.asarray(0.5 * S), jnp.asarray(0.5 * T)
  def norm(temp, scale):
    g = jax.grad(lambda s: jnp.sum(L.kd(s, t, temperature=temp)) * scale)(s)
    return float(jnp.linalg.norm(g))
  ratio = norm(1.0, 1.0) / norm(20.0, 1.0)
  assert 1 / 3 < ratio < 3
  assert norm(1.0, 1.0) / norm(20.0, 1 / 400) > 100


def test_ce_label_smoothing_uniform_target():
  # With label_smoothing -> everything but the smoothing mass is on the label; at 0 it is plain NLL.
  np.testing.assert_allclose(L.ce(S, LABELS), -np_log_softmax(S)[np.arange(B), LABELS], rtol=1e-6)
  np.testing.assert_allclose(L.ce(S, LABELS, label_smoothing=0.5), np_ce(S, LABELS, 0.5), rtol=1e-6)


def test_dkd_decomposes_kd():
  # Zhao et al. eq. (1)-(5): KD = TCKD + (1 - p^t_gt) * NCKD at the same temperature.
  tckd = L.dkd(S, T, LABELS, alpha=1.0, beta=0.0, temperature=3.0)
  nckd = L.dkd(S, T, LABELS, alpha=0.0, beta=1.0, temperature=3.0)
  pt_gt = np.exp(np_log_softmax(T / 3.0))[np.arange(B), LABELS]
  np.testing.assert_allclose(tckd + (1 - pt_gt) * nckd, L.kd(S, T, temperature=3.0), rtol=1e-5)


def test_jsd_and_tvd_bounds():
  s, t = 30 * S, -30 * S
  assert np.all(np.asarray(L.jsd(s, t)) <= np.log(2) + 1e-6)
  np.testing.assert_allclose(L.jsd(S, T), L.jsd(T, S), rtol=1e-5)  # symmetric at beta = 0.5
  assert np.all(np.asarray(L.tvd(s, t)) <= 1.0 + 1e-6)


def test_top_k_agreement_full_k_is_one():
  np.testing.assert_array_equal(L.top_k_agreement(S, T, k=C), 1.0)
  np.testing.assert_array_equal(L.top_k_agreement(S, S), 1.0)
