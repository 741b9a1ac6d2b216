"""Tests for kdlab.losses.features against independent numpy formulas (RepDistiller's math)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdlab.losses import features as F

# These programs are tiny: at XLA's default optimisation level compiling them costs far more than
# running them (and eager op-by-op dispatch compiles every primitive), so tests jit with cheap
# compiler settings. The numerics being checked do not depend on them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

B = 4
_rng = np.random.default_rng(1)


def _r(*shape):
  return _rng.normal(size=shape).astype(np.float32)


SV, TV = _r(B, 6), _r(B, 3)                      # vectors, widths may differ
SF, TF = _r(B, 4, 4, 3), _r(B, 4, 4, 5)          # NHWC, channels may differ
S4, T4 = _r(B, 2, 2, 3), _r(B, 2, 2, 3)          # same-shape pairs
LOG_SCALE = _r(3)
S_PAIR = (_r(B, 4, 4, 3), _r(B, 2, 2, 2))        # student taps differ in size: pooled 4x4 -> 2x2
T_PAIR = (_r(B, 4, 4, 3), _r(B, 4, 4, 2))
WHERE = np.array([True, False, True, True])


def tmap(f, *xs):
  return jax.tree_util.tree_map(f, *xs)


def np_normalize(x, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def np_smooth_l1(x):
  return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def np_flat(x):
  return np.asarray(x, np.float64).reshape(len(x), -1)


# Batch-level references (scalars) for relational losses ---------------------------------------

def np_sp(s, t):
  def g(x):
    x = np_flat(x)
    return np_normalize(x @ x.T)
  return ((g(t) - g(s))**2).sum() / len(s)**2


def np_rkd_distance(s, t):
  def psi(x):
    x = np_flat(x)
    d = np.sqrt(((x[None] - x[:, None])**2).sum(-1))
    return d / (d.sum() / (len(x) * (len(x) - 1)))  # mean over pairs i != j (duplicates count as 0)
  return np_smooth_l1(psi(s) - psi(t)).mean()


def np_rkd_angle(s, t):
  def psi(x):
    x = np_flat(x)
    e = np_normalize(x[None] - x[:, None])       # e[i, j] = x_j - x_i
    return np.einsum("ijd,ikd->ijk", e, e)
  return np_smooth_l1(psi(s) - psi(t)).mean()


def np_pkt(s, t, eps=1e-7):
  def cond(x):
    x = np_flat(x)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    sim = (x @ x.T + 1) / 2
    return sim / sim.sum(1, keepdims=True)
  ps, pt = cond(s), cond(t)
  return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_cc(s, t, gamma=0.4, order=2):
  def corr(x):
    x = np_normalize(np_flat(x))
    c = x @ x.T
    return sum(math.exp(-2 * gamma) * (2 * gamma)**p / math.factorial(p) * c**p for p in range(order + 1))
  return ((corr(s) - corr(t))**2).mean()


# Per-example references -----------------------------------------------------------------------

def np_fitnet(s, t):
  return np_flat((s - t)**2).mean(1)


def np_nst(s, t):
  def chan(x):  # NHWC -> [B, C, HW], unit norm over positions
    x = np.asarray(x, np.float64)
    return np_normalize(x.reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1))
  def k(a, b):
    return (np.einsum("bip,bjp->bij", a, b)**2).mean((1, 2))
  fs, ft = chan(s), chan(t)
  return k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)


def np_vid(s, t, log_scale, eps=1e-5):
  var = np.log1p(np.exp(np.asarray(log_scale, np.float64))) + eps
  return np_flat(0.5 * ((s - t)**2 / var + np.log(var))).mean(1)


def np_fsp(s_pair, t_pair):
  def pool(x, h):
    b, big, _, c = x.shape
    f = big // h
    return x.reshape(b, h, f, h, f, c).mean((2, 4))
  def g(pair):
    f1, f2 = (np.asarray(f, np.float64) for f in pair)
    h = min(f1.shape[1], f2.shape[1])
    f1, f2 = pool(f1, h), pool(f2, h)
    return np.stack([a.reshape(h * h, -1).T @ b.reshape(h * h, -1) / (h * h) for a, b in zip(f1, f2)])
  return ((g(s_pair) - g(t_pair))**2).mean((1, 2))


def np_ab(s, t, m=1.0):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  loss = (s + m)**2 * ((s > -m) & (t <= 0)) + (s - m)**2 * ((s <= m) & (t > 0))
  return np_flat(loss).sum(1)


def np_ft(s, t, p=1):
  return (np.abs(np_normalize(np_flat(s)) - np_normalize(np_flat(t)))**p).mean(1)


# name -> (fn(s, t, **kw), ref, relational, (s, t), zero when s == t)
CASES = {
    "fitnet": (F.fitnet, np_fitnet, False, (S4, T4), True),
    "sp": (F.sp, np_sp, True, (SF, TF), True),
    "rkd_distance": (F.rkd_distance, np_rkd_distance, True, (SV, TV), True),
    "rkd_angle": (F.rkd_angle, np_rkd_angle, True, (SV, TV), True),
    "pkt": (F.pkt, np_pkt, True, (SV, TV), True),
    "cc": (lambda s, t: F.cc(s, t, gamma=0.4, order=3), lambda s, t: np_cc(s, t, 0.4, 3),
           True, (SV, TV), True),
    "nst": (F.nst, np_nst, False, (SF, TF), True),
    "vid": (lambda s, t, **kw: F.vid(s, t, log_scale=LOG_SCALE, **kw),
            lambda s, t: np_vid(s, t, LOG_SCALE), False, (S4, T4), False),
    "fsp": (F.fsp, np_fsp, False, (S_PAIR, T_PAIR), True),
    "ab": (lambda s, t, **kw: F.ab(s, t, margin=0.5, **kw), lambda s, t: np_ab(s, t, 0.5),
           False, (S4, T4), False),
    "ft": (lambda s, t, **kw: F.ft(s, t, p=2, **kw), lambda s, t: np_ft(s, t, 2), False, (S4, T4), True),
}
NAMES = list(CASES)
PER_EXAMPLE = [n for n in NAMES if not CASES[n][2]]
ZERO_AT_EQUALITY = [n for n in NAMES if CASES[n][4]]


def _batch2(s, t):
  """Two different problems stacked on a new leading axis (for vmap)."""
  return tmap(lambda a: np.stack([a, 2.0 * a[::-1]]), s), tmap(lambda a: np.stack([a, a[::-1] - 1.0]), t)


def _program(name):
  """Everything the forward tests look at, as one jitted program."""
  fn, _, relational, _, _ = CASES[name]
  def run(s, t, s2, t2):
    res = dict(out=fn(s, t), equal=fn(s, s), vmapped=jax.vmap(fn)(s2, t2))
    if not relational:
      res["masked"] = fn(s, t, where=WHERE)
      res["sliced"] = fn(tmap(lambda a: a[WHERE], s), tmap(lambda a: a[WHERE], t))
    return res
  return jit(run)


def _value_and_grad(name):
  fn = CASES[name][0]
  def run(s, t):
    out, vjp = jax.vjp(lambda s: fn(s, t), s)
    return dict(out=out, grad=vjp(jnp.ones_like(out))[0])
  return jit(run)


PROGRAM = {name: _program(name) for name in NAMES}
VALUE_AND_GRAD = {name: _value_and_grad(name) for name in NAMES}


def _results(name):
  _, _, _, (s, t), _ = CASES[name]
  return PROGRAM[name](s, t, *_batch2(s, t))


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_jit_and_vmap(name):
  _, ref, relational, (s, t), _ = CASES[name]
  res = _results(name)
  assert res["out"].shape == (B,) and res["out"].dtype == jnp.float32
  got = jnp.mean(res["out"]) if relational else res["out"]  # relational: anchor mean = batch loss
  np.testing.assert_allclose(got, ref(s, t), rtol=1e-4, atol=1e-6)
  assert res["vmapped"].shape == (2, B)
  s2, t2 = _batch2(s, t)
  for i, v in enumerate(res["vmapped"]):
    si, ti = tmap(lambda a: a[i], s2), tmap(lambda a: a[i], t2)
    np.testing.assert_allclose(jnp.mean(v) if relational else v, ref(si, ti), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_grads(name):
  fn, _, _, (s, t), _ = CASES[name]
  check_grads(jax.jit(lambda s: jnp.sum(fn(s, t))), (tmap(jnp.asarray, s),), order=1, modes=["rev"],
              eps=1e-3, atol=1e-2, rtol=1e-2)


def test_vid_grads_wrt_log_scale():
  check_grads(jax.jit(lambda ls: jnp.sum(F.vid(S4, T4, log_scale=ls))), (jnp.asarray(LOG_SCALE),), order=1,
              modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_where_equals_slicing(name):
  res = _results(name)
  np.testing.assert_allclose(res["masked"][WHERE], res["sliced"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(res["masked"][~WHERE], 0.0)


@pytest.mark.parametrize("name", ZERO_AT_EQUALITY)
def test_zero_at_equality_and_non_negative(name):
  res = _results(name)
  np.testing.assert_allclose(res["equal"], 0.0, atol=1e-6)
  assert np.all(np.asarray(res["out"]) >= 0.0)


def test_ab_zero_beyond_margin_on_teacher_side():
  s = np.where(T4 > 0, 0.5 + 0.1 + np.abs(S4), -0.5 - 0.1 - np.abs(S4))
  np.testing.assert_array_equal(VALUE_AND_GRAD["ab"](s, T4)["out"], 0.0)  # margin 0.5


def test_relational_invariances():
  # RKD normalises by the mean distance (scale free) and uses differences (shift free); SP rows are
  # normalised (scale free); CC/PKT normalise each row.
  for name in ("rkd_distance", "rkd_angle"):
    fn = VALUE_AND_GRAD[name]
    np.testing.assert_allclose(fn(3.0 * SV + 5.0, TV)["out"], fn(SV, TV)["out"], rtol=1e-4, atol=1e-6)
  for name in ("cc", "pkt"):
    fn = VALUE_AND_GRAD[name]
    np.testing.assert_allclose(fn(3.0 * SV, TV)["out"], fn(SV, TV)["out"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(VALUE_AND_GRAD["sp"](3.0 * SF, TF)["out"], VALUE_AND_GRAD["sp"](SF, TF)["out"],
                             rtol=1e-4, atol=1e-6)


def test_rkd_duplicate_rows_finite():
  s = np.concatenate([SV[:2], SV[:2]])  # coincident points: zero difference vectors
  for name, ref in (("rkd_angle", np_rkd_angle), ("rkd_distance", np_rkd_distance)):
    res = VALUE_AND_GRAD[name](s, TV)
    assert np.all(np.isfinite(res["grad"]))
    np.testing.assert_allclose(jnp.mean(res["out"]), ref(s, TV), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_inputs_finite(name):
  _, _, _, (s, t), _ = CASES[name]
  res = VALUE_AND_GRAD[name](tmap(lambda a: 1e4 * np.sign(a), s), tmap(lambda a: -1e4 * np.sign(a[::-1]), t))
  assert np.all(np.isfinite(res["out"]))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(res["grad"]))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs(name):
  _, _, _, (s, t), _ = CASES[name]
  sb, tb = tmap(lambda a: jnp.asarray(a, jnp.bfloat16), s), tmap(lambda a: jnp.asarray(a, jnp.bfloat16), t)
  res = VALUE_AND_GRAD[name](sb, tb)
  assert res["out"].dtype == jnp.float32  # computed in float32 on the bf16-rounded values
  f32 = lambda a: a.astype(jnp.float32)
  np.testing.assert_allclose(res["out"], VALUE_AND_GRAD[name](tmap(f32, sb), tmap(f32, tb))["out"],
                             rtol=1e-5)
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
             for g in jax.tree_util.tree_leaves(res["grad"]))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: F.fitnet(S4, T4[:, :1]), ValueError, "s_feat and t_feat must have the same shape"),
    (lambda: F.fitnet(S4.astype(np.int32), T4), TypeError, "s_feat: expected a floating"),
    (lambda: F.sp(SV, TV[:3]), ValueError, "s_feat and t_feat must have the same batch size"),
    (lambda: F.sp(SV[:, 0], TV), ValueError, "s_feat: expected at least 2 dimensions"),
    (lambda: F.pkt(SV, TV[:3]), ValueError, "s and t must have the same batch size"),
    (lambda: F.rkd_distance(SV[:1], TV[:1]), ValueError, "batch of at least 2"),
    (lambda: F.rkd_angle(SV, TV.astype(np.int32)), TypeError, "t: expected a floating"),
    (lambda: F.pkt(SV, TV, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: F.cc(SV, TV, gamma=0.0), ValueError, "gamma must be > 0, got 0"),
    (lambda: F.cc(SV, TV, order=0), ValueError, "order must be > 0"),
    (lambda: F.cc(SV, TV, order=2.0), TypeError, "order must be an int"),
    (lambda: F.nst(SF, TF[:, :2]), ValueError, "s_feat and t_feat must have the same batch and spatial"),
    (lambda: F.vid(S4, T4, log_scale=LOG_SCALE[:2]), ValueError, "log_scale: expected shape"),
    (lambda: F.vid(S4, T4, log_scale=LOG_SCALE, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: F.vid(S4, T4, log_scale=np.zeros(3, np.int32)), TypeError, "log_scale: expected a floating"),
    (lambda: F.fsp(S_PAIR[0], T_PAIR), TypeError, "s_pair: expected a pair"),
    (lambda: F.fsp((S_PAIR[0], _r(B, 3, 3, 2)), T_PAIR), ValueError, r"s_pair\[0\]: cannot pool"),
    (lambda: F.fsp(S_PAIR, (T_PAIR[0], _r(B, 4, 4, 3))), ValueError, "s_pair and t_pair must give FSP"),
    (lambda: F.ab(S4, T4, margin=0.0), ValueError, "margin must be > 0"),
    (lambda: F.ab(S4, T4[:2]), ValueError, "s_preact and t_preact must have the same shape"),
    (lambda: F.ft(S4, T4, p=0), ValueError, "p must be > 0"),
    (lambda: F.ft(S4, T4[..., :2]), ValueError, "s_factor and t_factor must have the same shape"),
    (lambda: F.fitnet(S4, T4, where=WHERE[:2]), ValueError, "where"),
])
def test_errors_name_the_argument(call, exc, match):
  with pytest.raises(exc, match=match):
    jax.eval_shape(call)  # inputs are validated while tracing: nothing to compute
