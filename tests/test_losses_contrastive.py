"""Tests for kdlab.losses.contrastive: CRD against a numpy transcription of RepDistiller's
ContrastMemory / ContrastLoss math, and in-batch InfoNCE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdlab.losses import contrastive as C

# These programs are tiny: at XLA's default optimisation level compiling them costs far more than
# running them (and eager op-by-op dispatch compiles every primitive), so tests jit with cheap
# compiler settings. The numerics being checked do not depend on them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

B, N, D, K = 4, 10, 3, 5
_rng = np.random.default_rng(3)


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


S = np_normalize(_rng.normal(size=(B, D))).astype(np.float32)
T = np_normalize(_rng.normal(size=(B, D))).astype(np.float32)
IDX = np.array([0, 7, 3, 9], np.int32)
NEG = _rng.integers(0, N, size=(B, K)).astype(np.int32)
STATE = C.crd_init_state(N, D, jax.random.key(0))
KEY = jax.random.key(1)


def np_crd(s, t, idx, neg, mem_s, mem_t, z_s, z_t, temp, momentum):
  """One RepDistiller step: returns (per-anchor loss, new banks, Zs)."""
  s, t = np_normalize(s), np_normalize(t)
  mem_s, mem_t = np.asarray(mem_s, np.float64), np.asarray(mem_t, np.float64)
  all_idx = np.concatenate([idx[:, None], neg], 1)
  out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[all_idx], s) / temp)  # out_v1: student vs teacher bank
  out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[all_idx], t) / temp)  # out_v2: teacher vs student bank
  z_s = out_s.mean() * N if z_s < 0 else z_s
  z_t = out_t.mean() * N if z_t < 0 else z_t
  def nce(x):
    m, pn, eps = x.shape[1] - 1, 1.0 / N, 1e-7
    log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = np.log(m * pn / (x[:, 1:] + m * pn + eps))
    return -(log_d1 + log_d0.sum(1))
  loss = nce(out_s / z_s) + nce(out_t / z_t)
  new_s, new_t = mem_s.copy(), mem_t.copy()
  new_s[idx] = np_normalize(mem_s[idx] * momentum + s * (1 - momentum))
  new_t[idx] = np_normalize(mem_t[idx] * momentum + t * (1 - momentum))
  return loss, new_s, new_t, z_s, z_t


CRD_JIT = jit(C.crd, static_argnames=("num_negatives", "temperature", "momentum"))


def test_init_state():
  st = C.crd_init_state(N, D, jax.random.key(0))
  stdv = 1.0 / np.sqrt(D / 3)
  assert st.memory_s.shape == st.memory_t.shape == (N, D)
  assert np.all(np.abs(np.asarray(st.memory_s)) <= stdv) and np.all(np.abs(np.asarray(st.memory_t)) <= stdv)
  assert not np.allclose(st.memory_s, st.memory_t)
  assert float(st.z_s) == float(st.z_t) == -1.0


def test_crd_matches_repdistiller_over_two_steps():
  state, z_s, z_t = STATE, -1.0, -1.0
  mem_s, mem_t = np.asarray(STATE.memory_s), np.asarray(STATE.memory_t)
  for step in range(2):  # first step sets Z, second reuses it with the updated banks
    s, t = S * (step + 1), T[::-1]  # unnormalised input: normalised inside
    loss, state = CRD_JIT(s, t, IDX, state, key=KEY, num_negatives=K, temperature=0.1, momentum=0.5,
                          negative_indices=NEG)
    ref, mem_s, mem_t, z_s, z_t = np_crd(s, t, IDX, NEG, mem_s, mem_t, z_s, z_t, 0.1, 0.5)
    assert loss.shape == (B,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(state.memory_s, mem_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.memory_t, mem_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([state.z_s, state.z_t], [z_s, z_t], rtol=1e-5)


def test_crd_sampling_under_jit_and_vmap():
  loss, state = CRD_JIT(S, T, IDX, STATE, key=KEY, num_negatives=K)
  assert loss.shape == (B,) and np.all(np.isfinite(loss)) and float(state.z_s) > 0
  loss2, _ = CRD_JIT(S, T, IDX, STATE, key=KEY, num_negatives=K)
  np.testing.assert_array_equal(loss, loss2)  # same key, same negatives
  # Reproduce the sampled negatives: uniform ints in [0, N) drawn from the key.
  neg = np.asarray(jax.random.randint(KEY, (B, K), 0, N))
  ref = np_crd(S, T, IDX, neg, STATE.memory_s, STATE.memory_t, -1.0, -1.0, 0.07, 0.5)[0]
  np.testing.assert_allclose(loss, ref, rtol=1e-4)
  # vmap over two independent banks (e.g. two tapped layers).
  states = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), STATE)
  run = jit(jax.vmap(lambda s, t, st: C.crd(s, t, IDX, st, key=KEY, num_negatives=K)))
  losses, new_states = run(np.stack([S, S]), np.stack([T, T]), states)
  np.testing.assert_allclose(losses[1], loss, rtol=1e-6)
  np.testing.assert_allclose(new_states.memory_t[1], state.memory_t, rtol=1e-6)


def test_crd_grads():
  # Z set by a first call: afterwards Z is a constant and numerical gradients apply.
  _, state = CRD_JIT(S, T, IDX, STATE, key=KEY, num_negatives=K, negative_indices=NEG)
  def f(s, t):
    return jnp.sum(C.crd(s, t, IDX, state, key=KEY, num_negatives=K, negative_indices=NEG)[0])
  check_grads(jax.jit(f), (jnp.asarray(S), jnp.asarray(T)), order=1, modes=["rev"],
              eps=1e-3, atol=1e-2, rtol=1e-2)
  # The state never carries gradient: grads w.r.t. the banks are zero.
  g = jit(jax.grad(lambda st: jnp.sum(C.crd(S, T, IDX, st, key=KEY, num_negatives=K,
                                                negative_indices=NEG)[0])))(state)
  np.testing.assert_array_equal(g.memory_s, 0.0)


def test_crd_bfloat16_and_extreme_inputs_finite():
  f = jit(jax.value_and_grad(
      lambda s, t: jnp.sum(C.crd(s, t, IDX, STATE, key=KEY, num_negatives=K)[0])))
  for s, t in [(jnp.asarray(S, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16)), (1e4 * S, -1e4 * T)]:
    loss, grad = f(s, t)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert grad.dtype == s.dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


def np_info_nce(s, t, temp):
  logits = np_normalize(s) @ np_normalize(t).T / temp
  def lsm(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))
  return -0.5 * (np.diag(lsm(logits)) + np.diag(lsm(logits.T)))


def test_info_nce_matches_numpy_jit_vmap_grads():
  def f(s, t):
    return C.info_nce(s, t, temperature=0.2)
  out = jit(f)(S, T)
  assert out.shape == (B,) and np.all(np.asarray(out) >= 0)
  np.testing.assert_allclose(out, np_info_nce(S, T, 0.2), rtol=1e-5)
  np.testing.assert_allclose(jit(jax.vmap(f))(np.stack([S, T]), np.stack([T, S]))[1],
                             np_info_nce(T, S, 0.2), rtol=1e-5)
  check_grads(jax.jit(lambda s: jnp.sum(f(s, T))), (jnp.asarray(S),), order=1, modes=["rev"],
              eps=1e-3, atol=1e-2, rtol=1e-2)
  # Orthonormal, aligned embeddings at a low temperature: near-zero loss.
  eye = np.eye(B, dtype=np.float32)
  np.testing.assert_allclose(jit(C.info_nce)(eye, 3 * eye, temperature=0.01), 0.0, atol=1e-6)
  value_and_grad = jit(jax.value_and_grad(lambda s, t: jnp.sum(C.info_nce(s, t))))
  for s, t in [(jnp.asarray(S, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16)), (1e4 * S, -1e4 * T)]:
    loss, grad = value_and_grad(s, t)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_negatives=0), ValueError, "num_negatives must be > 0, got 0"),
    (dict(num_negatives=-3), ValueError, "num_negatives must be > 0"),
    (dict(num_negatives=2.0), TypeError, "num_negatives must be an int"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(s_embed=S[:, :2]), ValueError, "s_embed and t_embed must have the same shape"),
    (dict(s_embed=S[:, :2], t_embed=T[:, :2]), ValueError, "s_embed: embedding size 2"),
    (dict(s_embed=S.astype(np.int32)), TypeError, "s_embed: expected a floating"),
    (dict(indices=IDX.astype(np.float32)), TypeError, "indices: expected an integer"),
    (dict(indices=IDX[:2]), ValueError, "indices: expected shape"),
    (dict(state=(1, 2)), TypeError, "state: expected a CRDState"),
    (dict(negative_indices=NEG[:, :2]), ValueError, "negative_indices: expected shape"),
])
def test_crd_errors_name_the_argument(kwargs, exc, match):
  args = dict(s_embed=S, t_embed=T, indices=IDX, state=STATE, key=KEY, num_negatives=K)
  args.update(kwargs)
  with pytest.raises(exc, match=match):
    jax.eval_shape(lambda: C.crd(args.pop("s_embed"), args.pop("t_embed"), args.pop("indices"),
                                 args.pop("state"), **args))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: C.info_nce(S, T, temperature=0), ValueError, "temperature must be > 0"),
    (lambda: C.info_nce(S, T[:, :2]), ValueError, "s_embed and t_embed must have the same shape"),
    (lambda: C.info_nce(S, T.astype(np.int32)), TypeError, "t_embed: expected a floating"),
    (lambda: C.crd_init_state(0, D, KEY), ValueError, "num_examples must be > 0"),
    (lambda: C.crd_init_state(N, 2.5, KEY), TypeError, "dim must be an int"),
])
def test_other_errors(call, exc, match):
  with pytest.raises(exc, match=match):
    jax.eval_shape(call)  # inputs are validated while tracing: nothing to compute
