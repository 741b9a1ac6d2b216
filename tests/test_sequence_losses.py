"""Token-level distillation losses: numpy references, chunked and fused equal plain, top-k, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdlab.losses import logits as logit_losses
from kdlab.losses import fused_head, sequence

B, L, D_S, D_T, V = 2, 16, 32, 24, 96
DIVS = sequence.DIVERGENCES
HP = dict(temperature=2.0, beta=0.3)


def _hparams(div):
  return HP if div == "jsd" else dict(temperature=HP["temperature"])


@pytest.fixture(scope="module")
def data():
  k = jax.random.split(jax.random.key(0), 5)
  mask = np.ones((B, L), np.float32)
  mask[0, 11:] = 0  # a padded sequence
  mask[1, ::5] = 0  # holes
  return dict(
      s_h=jax.random.normal(k[0], (B, L, D_S)), s_w=0.4 * jax.random.normal(k[1], (D_S, V)),
      t_h=jax.random.normal(k[2], (B, L, D_T)), t_w=0.4 * jax.random.normal(k[3], (D_T, V)),
      mask=jnp.asarray(mask))


# --- numpy references -------------------------------------------------------------------------

def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(div, s, t, temperature=1.0, beta=0.5):
  lps, lpt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
  ps, pt = np.exp(lps), np.exp(lpt)
  if div == "kd":
    return temperature**2 * (pt * (lpt - lps)).sum(-1)
  if div == "reverse_kl":
    return temperature**2 * (ps * (lps - lpt)).sum(-1)
  if div == "jsd":
    m = beta * pt + (1 - beta) * ps
    return temperature**2 * (beta * (pt * (lpt - np.log(m))).sum(-1)
                             + (1 - beta) * (ps * (lps - np.log(m))).sum(-1))
  return 0.5 * np.abs(pt - ps).sum(-1)


def _np_token_loss(div, s, t, mask, **hp):
  per_token = _np_divergence(div, np.float64(s), np.float64(t), **hp)
  return (per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


def _logits(d):
  return d["s_h"] @ d["s_w"], d["t_h"] @ d["t_w"]


@pytest.mark.parametrize("div", DIVS)
def test_token_loss_matches_numpy(data, div):
  s, t = _logits(data)
  want = _np_token_loss(div, np.asarray(s), np.asarray(t), np.asarray(data["mask"]), **_hparams(div))
  got = sequence.token_loss(sequence.divergence_fn(div), s, t, data["mask"], **_hparams(div))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  got_jit = jax.jit(lambda s, t: sequence.token_loss(div, s, t, data["mask"], **_hparams(div)))(s, t)
  np.testing.assert_allclose(got_jit, want, rtol=1e-5, atol=1e-6)


def test_token_loss_accepts_logit_losses_and_handles_empty_sequences(data):
  s, t = _logits(data)
  mask = data["mask"].at[1].set(0.0)
  got = sequence.token_loss(logit_losses.kd, s, t, mask, temperature=3.0)
  want = _np_token_loss("kd", np.asarray(s), np.asarray(t), np.asarray(mask), temperature=3.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[1] == 0.0
  # Masked tokens do not count: garbage there changes nothing.
  s_bad = s.at[0, 12].set(jnp.nan)
  np.testing.assert_allclose(sequence.token_loss(logit_losses.kd, s_bad, t, mask, temperature=3.0), got)


@pytest.mark.parametrize("div", DIVS)
def test_zero_when_student_equals_teacher(data, div):
  s, _ = _logits(data)
  np.testing.assert_allclose(sequence.token_loss(div, s, s, data["mask"]), 0.0, atol=1e-6)


# --- chunked and fused equal plain -------------------------------------------------------------

def _plain_from_hidden(div, d):
  def f(s_h, s_w):
    return sequence.token_loss(div, s_h @ s_w, d["t_h"] @ d["t_w"], d["mask"], **_hparams(div))
  return f


def _assert_close_tree(got, want, rtol=1e-5):
  for g, w in zip(got, want):
    atol = rtol * float(jnp.max(jnp.abs(w)))  # elementwise rtol, with zero entries allowed
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("div", DIVS)
def test_chunked_equals_plain(data, div):
  s, t = _logits(data)
  plain = lambda s: sequence.token_loss(div, s, t, data["mask"], **_hparams(div))  # noqa: E731
  want, want_grad = plain(s), jax.grad(lambda s: plain(s).mean())(s)
  for chunk in (8, 7):  # divides B * L; does not (padded)
    chunked = lambda s: sequence.chunked_token_kd(  # noqa: E731
        s, t, data["mask"], divergence=div, chunk_size=chunk, **HP)
    np.testing.assert_allclose(chunked(s), want, rtol=1e-5, atol=1e-7)
    _assert_close_tree([jax.jit(jax.grad(lambda s: chunked(s).mean()))(s)], [want_grad])


@pytest.mark.parametrize("div", DIVS)
def test_fused_equals_plain(data, div):
  d = data
  plain = _plain_from_hidden(div, d)

  def fused(s_h, s_w):
    return fused_head.fused_token_kd(s_h, s_w, d["t_h"], d["t_w"], d["mask"], divergence=div,
                                   chunk_size=12, **HP)

  np.testing.assert_allclose(jax.jit(fused)(d["s_h"], d["s_w"]), plain(d["s_h"], d["s_w"]),
                             rtol=1e-5, atol=1e-7)
  # Mean over the batch (gradient taken in the forward pass) and a non-uniform weighting
  # (the recomputing backward pass).
  for reduce in (jnp.mean, lambda x: jnp.sum(x * jnp.array([0.25, 1.5]))):
    want = jax.grad(lambda a, b: reduce(plain(a, b)), (0, 1))(d["s_h"], d["s_w"])
    got = jax.jit(jax.grad(lambda a, b: reduce(fused(a, b)), (0, 1)))(d["s_h"], d["s_w"])
    _assert_close_tree(got, want)


def test_fused_traced_temperature_and_teacher_is_constant(data):
  d = data

  def loss(s_h, t_w, temperature):
    return fused_head.fused_token_kd(s_h, d["s_w"], d["t_h"], t_w, d["mask"], chunk_size=16,
                                   temperature=temperature).mean()

  value, (g_h, g_tw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(d["s_h"], d["t_w"], 3.0)
  want = sequence.token_loss("kd", d["s_h"] @ d["s_w"], d["t_h"] @ d["t_w"], d["mask"],
                             temperature=3.0).mean()
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert float(jnp.abs(g_h).max()) > 0 and float(jnp.abs(g_tw).max()) == 0.0


def test_bad_inputs(data):
  d = data
  s, t = _logits(d)
  with pytest.raises(ValueError, match="vocab sizes differ"):
    fused_head.fused_token_kd(d["s_h"], d["s_w"], d["t_h"], d["t_w"][:, :-1], d["mask"])
  with pytest.raises(ValueError, match="t_logits"):
    sequence.chunked_token_kd(s, t[..., :-1], d["mask"])
  with pytest.raises(ValueError, match="divergence"):
    sequence.chunked_token_kd(s, t, d["mask"], divergence="kl")
  with pytest.raises(ValueError, match="mask"):
    sequence.token_loss("kd", s, t, d["mask"][:, :-1])
  with pytest.raises(ValueError, match="beta"):
    sequence.chunked_token_kd(s, t, d["mask"], divergence="jsd", beta=1.0)
  lp, idx = jax.lax.top_k(jax.nn.log_softmax(t[..., :8]), 8)
  with pytest.raises(ValueError, match="exceeds"):
    sequence.topk_kd(s[..., :4], lp, idx, d["mask"])


# --- top-k teacher ----------------------------------------------------------------------------

# k = V (the whole vocabulary) equals kd: tests/test_teacher_cache.py, through a built cache.


def test_topk_kd_bucket_matches_numpy(data):
  s, t = (np.asarray(x, np.float64) for x in _logits(data))
  k = 10
  lpt = _np_log_softmax(t)
  idx = np.argsort(-lpt, axis=-1)[..., :k]
  top = np.take_along_axis(lpt, idx, -1)
  qt = np.concatenate([np.exp(top), 1 - np.exp(top).sum(-1, keepdims=True)], -1)
  ps = np.exp(_np_log_softmax(s))
  ps_top = np.take_along_axis(ps, idx, -1)
  qs = np.concatenate([ps_top, 1 - ps_top.sum(-1, keepdims=True)], -1)
  per_token = (qt * np.log(qt / qs)).sum(-1)
  mask = np.asarray(data["mask"])
  want = (per_token * mask).sum(-1) / mask.sum(-1)
  got = sequence.topk_kd(jnp.float32(s), jnp.float32(top), jnp.int32(idx), data["mask"])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  rest = np.log(1 - np.exp(top).sum(-1))
  got_rest = sequence.topk_kd(jnp.float32(s), jnp.float32(top), jnp.int32(idx), data["mask"],
                              rest_logprobs=jnp.float32(rest))
  np.testing.assert_allclose(got_rest, want, rtol=1e-4)


# --- vocab-sharded logits on 8 simulated devices -------------------------------------------------

_SHARDED = textwrap.dedent("""
  import json, os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from kdlab.losses import fused_head, sequence
  B, L, D, V = 4, 16, 32, 128
  k = jax.random.split(jax.random.key(1), 4)
  s_h, t_h = jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (B, L, D))
  s_w, t_w = 0.4 * jax.random.normal(k[2], (D, V)), 0.4 * jax.random.normal(k[3], (D, V))
  s, t = np.asarray(s_h @ s_w), np.asarray(t_h @ t_w)
  mask = np.ones((B, L), np.float32); mask[1, 9:] = 0
  out = {"devices": len(jax.devices())}
  err = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())

  def check(tag, mesh, divergences):
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    ss, ts = put(s, P("data", None, "model")), put(t, P("data", None, "model"))
    ms = put(mask, P("data", None))
    out[tag + "/spec"] = str(ss.sharding.spec)
    for div in divergences:
      plain = lambda s, t, m: sequence.token_loss(div, s, t, m, temperature=2.0)
      chunked = lambda s, t, m: sequence.chunked_token_kd(s, t, m, divergence=div, chunk_size=12,
                                                           temperature=2.0)
      ref, ref_grad = jax.jit(lambda s: (plain(s, t, mask), jax.grad(lambda s: plain(s, t, mask).mean())(s)))(s)
      ref, ref_grad = np.asarray(ref), np.asarray(ref_grad)
      for name, f in (("plain", plain), ("chunked", chunked)):
        val, grad = jax.jit(lambda s, t, m: (f(s, t, m), jax.grad(lambda s: f(s, t, m).mean())(s)))(
            ss, ts, ms)
        out[f"{tag}/{div}/{name}"] = [err(val, ref), err(grad, ref_grad)]
      fused = lambda a, b, m: fused_head.fused_token_kd(
          a, b, put(np.asarray(t_h), P("data")), put(np.asarray(t_w), P(None, "model")), m,
          divergence=div, chunk_size=12, temperature=2.0).mean()
      grad_ref = jax.jit(jax.grad(lambda a, b: plain(a @ b, t, mask).mean(), (0, 1)))(s_h, s_w)
      val, grad = jax.jit(jax.value_and_grad(fused, (0, 1)))(
          put(np.asarray(s_h), P("data")), put(np.asarray(s_w), P(None, "model")), ms)
      out[f"{tag}/{div}/fused"] = [err(val, ref.mean()), max(err(grad[0], np.asarray(grad_ref[0])),
                                                            err(grad[1], np.asarray(grad_ref[1])))]

  # Explicit mesh axes (jax.make_mesh's default) need the mesh set, as in training.
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  with jax.set_mesh(mesh):
    check("explicit", mesh, ["kd", "jsd"])
  check("auto", jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2), ["tvd"])
  print(json.dumps(out))
""")


def test_vocab_sharded_equals_unsharded():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env,
                        cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out.pop("devices") == 8
  for tag in ("explicit", "auto"):
    assert out.pop(f"{tag}/spec") == str(jax.sharding.PartitionSpec("data", None, "model"))
  assert len(out) == 3 * 3
  for name, (val_err, grad_err) in out.items():
    assert val_err < 1e-5 and grad_err < 1e-5, (name, val_err, grad_err)
