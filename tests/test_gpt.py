"""The "gpt" decoder-only LM: shapes, taps, causality, sharding names (its training: test_lm_train.py)."""

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
from flax import nnx

import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab.models import registry

CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=16)


@pytest.fixture(scope="module")
def model():
  return registry.create("gpt", seed=0, **CFG)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 0, CFG["vocab_size"], jnp.int32)


def test_outputs_and_default_feats(model, tokens):
  logits, feats = model(tokens, train=False)
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  assert set(feats) == {"block0", "block1", "final"}
  assert all(feats[k].shape == (2, 12, 32) for k in feats)
  np.testing.assert_allclose(feats["final"] @ model.unembedding(), logits, rtol=1e-5, atol=1e-6)
  assert model.unembedding().shape == (32, 64)


def test_attention_and_value_taps(model, tokens):
  logits, _ = model(tokens, train=False)
  tapped, feats = model(tokens, train=False, taps=("attn1", "values0", "block1"))
  assert set(feats) == {"block0", "block1", "final", "attn1", "values0"}
  np.testing.assert_allclose(tapped, logits, rtol=1e-5, atol=1e-6)  # same math on both paths
  probs = feats["attn1"]
  assert probs.shape == (2, 4, 12, 12) and feats["values0"].shape == (2, 4, 12, 8)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0  # causal


def test_causal(model, tokens):
  logits, _ = model(tokens, train=False)
  changed, _ = model(tokens.at[:, 7:].set(3), train=False)
  np.testing.assert_allclose(changed[:, :7], logits[:, :7], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(changed[:, 7:] - logits[:, 7:]).max()) > 1e-4


def test_untied_layernorm_dropout():
  m = registry.create("gpt", seed=1, tie_embeddings=False, norm="layer", dropout=0.5, **CFG)
  tok = jnp.zeros((1, 8), jnp.int32)
  logits, feats = m(tok, train=False)
  np.testing.assert_allclose(feats["final"] @ m.unembedding(), logits, rtol=1e-5, atol=1e-6)
  assert m.unembed.shape == (32, 64)
  np.testing.assert_allclose(m(tok, train=False)[0], logits)  # eval is deterministic
  assert float(jnp.abs(m(tok, train=True)[0] - logits).max()) > 0  # dropout active in training


def test_bad_input(model):
  with pytest.raises(ValueError, match="max_len=16"):
    model(jnp.zeros((1, 17), jnp.int32), train=False)
  with pytest.raises(ValueError, match="taps"):
    model(jnp.zeros((1, 4), jnp.int32), train=False, taps=("attn7",))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((1, 4), jnp.float32), train=False)


def test_logical_axis_names(model):
  params = nnx.state(model, nnx.Param)
  names = {tuple(p.out_sharding) for p in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert names <= {("vocab", "embed"), ("embed", "heads"), ("heads", "embed"), ("embed", "mlp"),
                   ("mlp", "embed"), ("embed",)}
  rules = [("vocab", "model"), ("heads", "model"), ("mlp", "model"), ("embed", None)]
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(params)
  assert specs["embed"]["embedding"].get_value() == jax.P("model", None)
  assert specs["blocks"][0]["mlp"]["up"]["kernel"].get_value() == jax.P(None, "model")


_SHARDED = textwrap.dedent("""
  import json, os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, numpy as np
  from flax import nnx
  import kdlab.models.gpt
  from kdlab.models import registry
  cfg = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=16, seed=0)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 64
  ref = np.asarray(registry.create("gpt", **cfg)(tokens, train=False)[0])
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  rules = [("vocab", "model"), ("heads", "model"), ("mlp", "model"), ("embed", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = registry.create("gpt", **cfg)
    spec = str(model.embed.embedding.get_value().sharding.spec)
    logits = nnx.jit(lambda m, x: m(x, train=False)[0])(model, tokens)
  print(json.dumps({"spec": spec, "err": float(np.abs(np.asarray(logits) - ref).max())}))
""")


def test_created_sharded_under_a_mesh():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env,
                        cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["spec"] == str(jax.P("model", None))
  assert out["err"] < 1e-5
