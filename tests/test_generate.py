"""KV-cache decoding and ``kdlab.generate`` (kdlab.sampling): equal to full recomputation, greedy/top-k/top-p
semantics, right-padded batches, bad input, a mesh, and ``kdlab sample`` on a saved run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kdlab
import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab import cli
from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError
from kdlab.sampling import sample_logits
from kdlab.models import registry

CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=24, tie_embeddings=False)
N = 8  # new tokens


def _peaked(model: nnx.Module, scale: float = 25.0) -> nnx.Module:
  """Scales the (untied) unembedding so next-token distributions are peaked, about 2 nats of
  entropy as in a trained model (at init they are nearly uniform, which would make top-k/top-p
  filtering trivial; tied and scaled, the model would only repeat its last token)."""
  model.unembed.set_value(model.unembed.get_value() * scale)
  return model


@pytest.fixture(scope="module")
def model():
  return _peaked(registry.create("gpt", seed=0, **CFG))


@pytest.fixture(scope="module")
def prompts():
  """Three right-padded prompts of lengths 6, 2 and 4 (padding columns hold junk, not zeros)."""
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 6), 1, CFG["vocab_size"]), np.int32)
  return tokens, np.array([6, 2, 4], np.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens, train=False)[0]


@nnx.jit
def _decode(model, tokens, cache, positions):
  return model.decode(tokens, cache, positions)


def _greedy_reference(model, prompt: np.ndarray, n: int) -> list[int]:
  """Greedy continuation by the plain forward pass, one prompt at a time, in Python: the growing
  sequence sits in a buffer of the model's full width (one compilation per model; causal, so the
  zeros after it do not change the logits read)."""
  seq = np.zeros((1, model.max_len), np.int32)
  seq[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    seq[0, i] = int(jnp.argmax(_forward(model, seq)[0, i - 1]))
  return seq[0, len(prompt):len(prompt) + n].tolist()


def test_decode_logits_equal_call(model):
  tokens = jax.random.randint(jax.random.key(2), (2, 14), 0, CFG["vocab_size"], jnp.int32)
  ref, _ = model(tokens, train=False)
  cache = model.init_cache(2)  # max_len slots, more than the sequence uses
  logits, cache = _decode(model, tokens[:, :5], cache, jnp.arange(5))  # prefill
  pieces = [logits]
  for i in range(5, 14):
    logits, cache = _decode(model, tokens[:, i:i + 1], cache, jnp.full((2, 1), i))
    pieces.append(logits)
  got = jnp.concatenate(pieces, axis=1)
  assert got.shape == ref.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_decode_rows_at_their_own_positions(model):
  """Row 1 is decoded 3 positions behind row 0 in the same calls; each equals its own forward pass."""
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, CFG["vocab_size"], jnp.int32)
  ref, _ = model(tokens, train=False)
  cache = model.init_cache(2)
  _, cache = _decode(model, tokens[:, :5], cache, jnp.arange(5))  # row 1's slot 4 is junk from here on
  got0, got1 = [], []
  for i in range(5, 10):
    pos = jnp.array([[i], [i - 1]])
    logits, cache = _decode(model, tokens[jnp.arange(2)[:, None], pos], cache, pos)
    got0.append(logits[0, 0])
    got1.append(logits[1, 0])
  np.testing.assert_allclose(jnp.stack(got0), ref[0, 5:10], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.stack(got1), ref[1, 4:9], rtol=1e-5, atol=1e-5)


def test_init_cache_bounds(model):
  cache = model.init_cache(3, 10, jnp.bfloat16)
  assert cache.length == 10 and len(cache.keys) == 2 and cache.keys[0].shape == (3, 10, 4, 8)
  assert cache.values[1].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="max_len=24"):
    model.init_cache(1, 25)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_argmax_of_the_forward_pass(model, prompts, use_cache):
  tokens, lengths = prompts
  out = kdlab.generate(model, tokens, max_new_tokens=N, temperature=0.0, prompt_lengths=lengths,
                       use_cache=use_cache)
  assert out.tokens.shape == (3, 6 + N) and out.tokens.dtype == jnp.int32
  for b, n in enumerate(lengths):
    expected = _greedy_reference(model, tokens[b, :n], N)
    np.testing.assert_array_equal(out.tokens[b, :n], tokens[b, :n])  # the prompt is kept
    np.testing.assert_array_equal(out.tokens[b, n:n + N], expected)
    np.testing.assert_array_equal(out.tokens[b, n + N:], 0)  # pad_id after the generated tokens
    np.testing.assert_array_equal(np.flatnonzero(out.mask[b]), np.arange(n, n + N))


def test_cached_equals_full_recomputation_when_sampling(model, prompts):
  tokens, lengths = prompts
  kw = dict(max_new_tokens=N, prompt_lengths=lengths, key=jax.random.key(7), temperature=0.8, top_k=5, top_p=0.9)
  cached = kdlab.generate(model, tokens, **kw)
  full = kdlab.generate(model, tokens, use_cache=False, **kw)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.mask, full.mask)
  greedy = kdlab.generate(model, tokens, max_new_tokens=N, temperature=0.0, prompt_lengths=lengths)
  assert not np.array_equal(cached.tokens, greedy.tokens)  # it did sample
  other_key = kdlab.generate(model, tokens, **{**kw, "key": jax.random.key(8)})
  assert not np.array_equal(cached.tokens, other_key.tokens)


def test_top_k_1_is_greedy(model, prompts):
  tokens, lengths = prompts
  greedy = kdlab.generate(model, tokens, max_new_tokens=N, temperature=0.0, prompt_lengths=lengths)
  out = kdlab.generate(model, tokens, max_new_tokens=N, temperature=1.5, top_k=1, key=jax.random.key(0),
                       prompt_lengths=lengths)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_batch_equals_each_prompt_alone(model, prompts):
  tokens, lengths = prompts
  keys = jax.random.split(jax.random.key(5), 3)
  greedy = kdlab.generate(model, tokens, max_new_tokens=N, temperature=0.0, prompt_lengths=lengths)
  sampled = kdlab.generate(model, tokens, max_new_tokens=N, temperature=1.0, key=keys, prompt_lengths=lengths)
  for b, n in enumerate(lengths):
    alone = np.zeros((1, 6), np.int32)  # a batch of one, zero-padded to the same width (one compilation)
    alone[0, :n] = tokens[b, :n]
    kw = dict(max_new_tokens=N, prompt_lengths=[n])
    np.testing.assert_array_equal(greedy.tokens[b], kdlab.generate(model, alone, temperature=0.0, **kw).tokens[0])
    np.testing.assert_array_equal(sampled.tokens[b],
                                  kdlab.generate(model, alone, temperature=1.0, key=keys[b:b + 1], **kw).tokens[0])


def test_sample_logits_filters():
  probs = jnp.array([0.4, 0.3, 0.2, 0.1])
  rows = 4000
  logits = jnp.broadcast_to(jnp.log(probs), (rows, 4))
  keys = jax.random.split(jax.random.key(0), rows)

  def draw(**kw):
    return np.asarray(sample_logits(logits, keys, **kw))

  np.testing.assert_array_equal(draw(temperature=0.0), 0)
  for kw, allowed in ((dict(top_k=2), {0, 1}), (dict(top_p=0.5), {0, 1}), (dict(top_p=0.75), {0, 1, 2}),
                      (dict(top_p=0.35), {0}), (dict(top_k=3, top_p=0.95), {0, 1, 2}), ({}, {0, 1, 2, 3})):
    got = draw(temperature=1.0, **kw)
    assert set(got.tolist()) == allowed, kw
  got = draw(temperature=1.0, top_k=2)
  assert abs(np.mean(got == 0) - 0.4 / 0.7) < 0.03  # renormalized over the kept tokens
  got = draw(temperature=1.0)
  assert abs(np.mean(got == 3) - 0.1) < 0.02
  hot = draw(temperature=100.0)  # nearly uniform
  assert abs(np.mean(hot == 3) - 0.25) < 0.03


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=4, temperature=-0.5), "temperature must be a number >= 0"),
    (dict(max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=4, top_k=0), "top_k must be an int >= 1"),
    (dict(max_new_tokens=19), "prompt longer than the model's context"),
    (dict(max_new_tokens=4, prompt_lengths=[6, 0, 3]), r"prompt_lengths: every length must be in \[1, 6\]"),
    (dict(max_new_tokens=4, prompt_lengths=[6, 7, 3]), r"prompt_lengths: every length must be in \[1, 6\]"),
    (dict(max_new_tokens=4, prompt_lengths=[6, 3]), r"prompt_lengths: expected \[3\] integers"),
    (dict(max_new_tokens=4, temperature=1.0, key=None), "key: sampling"),
])
def test_bad_input(model, prompts, kwargs, match):
  kwargs = {"key": jax.random.key(0), **kwargs}
  with pytest.raises(UserError, match=match) as info:
    kdlab.generate(model, prompts[0], **kwargs)
  assert "\n" not in str(info.value)


def test_bad_prompts_and_model(model):
  with pytest.raises(UserError, match="prompts: expected"):
    kdlab.generate(model, np.zeros((2, 3), np.float32), max_new_tokens=2, temperature=0.0)
  with pytest.raises(UserError, match="prompts: expected"):
    kdlab.generate(model, np.zeros((3,), np.int32), max_new_tokens=2, temperature=0.0)
  mlp = registry.create("mlp", num_classes=3) if "mlp" in registry.names() else nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="no KV cache"):
    kdlab.generate(mlp, np.zeros((1, 3), np.int32), max_new_tokens=2, temperature=0.0)


def test_inside_jit_and_under_a_data_mesh(model, prompts):
  tokens, lengths = prompts
  kw = dict(max_new_tokens=N, temperature=1.0, key=jax.random.key(3))
  ref = kdlab.generate(model, tokens, prompt_lengths=lengths, **kw)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, t, n: kdlab.generate(nnx.merge(graphdef, s), t, prompt_lengths=n, **kw))
  np.testing.assert_array_equal(jitted(state, tokens, lengths).tokens, ref.tokens)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = [("vocab", None), ("heads", None), ("mlp", None), ("embed", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    meshed = _peaked(registry.create("gpt", seed=0, **CFG))
    out = kdlab.generate(meshed, tokens, prompt_lengths=lengths, **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)


_SHARDED = textwrap.dedent("""
  import json, os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax, numpy as np
  from flax import nnx
  import kdlab, kdlab.models.gpt
  from kdlab.models import registry
  cfg = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=24, seed=0)
  tokens = (np.arange(24, dtype=np.int32).reshape(4, 6) * 7) % 64
  kw = dict(max_new_tokens=8, temperature=1.0, key=jax.random.key(0), prompt_lengths=np.array([6, 2, 4, 1]))
  ref = kdlab.generate(registry.create("gpt", **cfg), tokens, **kw)
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("vocab", "model"), ("heads", "model"), ("mlp", "model"), ("embed", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = registry.create("gpt", **cfg)
    out = kdlab.generate(model, tokens, **kw)
  print(json.dumps({"spec": str(out.tokens.sharding.spec),
                    "equal": bool((np.asarray(out.tokens) == np.asarray(ref.tokens)).all())}))
""")


@pytest.mark.slow
def test_sharded_over_data_and_model_axes():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, cwd=root,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == {"spec": str(jax.P("data")), "equal": True}


# --- kdlab sample ------------------------------------------------------------------------------

LM = dict(name="gpt", vocab_size=256, d_model=32, num_layers=1, num_heads=2, max_len=32, tie_embeddings=False)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """A run directory in the training loop's layout: config.json and an orbax checkpoint of the
  train state, the student under ``params["student"]`` (a random, peaked gpt)."""
  from kdlab.train.checkpoint import Checkpointer
  from kdlab.train.state import Learner, init_state
  workdir = tmp_path_factory.mktemp("lm_run")
  kwargs = {k: v for k, v in LM.items() if k != "name"}
  student = _peaked(registry.create("gpt", seed=3, **kwargs))
  (workdir / "config.json").write_text(json.dumps({"model": LM, "data": {"source": "pysrc"}, "seed": 0}))
  _, state = init_state(Learner(student, {}), optax.sgd(0.1), {}, seed=0)
  ckpt = Checkpointer(workdir / "checkpoints")
  ckpt.save(5, state, {})
  ckpt.close()
  return workdir, student


def test_sample_prints_the_continuation(lm_run, capsys):
  workdir, student = lm_run
  prompt = "def f("
  assert cli.main(["sample", f"--workdir={workdir}", f"--prompt={prompt}", "--max_new_tokens=12",
                   "--temperature=0"]) == 0
  printed = capsys.readouterr().out
  ids = np.concatenate([[ByteTokenizer.EOD], ByteTokenizer().encode(prompt)])
  new = _greedy_reference(student, ids, 12)  # the saved student, greedily
  new = new[: new.index(0)] if 0 in new else new
  assert printed == prompt + ByteTokenizer().decode(new) + "\n"
  # Sampling: reproducible per seed, and the default fills the context (32 - 1 - 0 tokens).
  runs = []
  for seed in (1, 1, 2):
    assert cli.main(["sample", f"--workdir={workdir}", "--prompt=", f"--seed={seed}", "--top_p=0.95"]) == 0
    runs.append(capsys.readouterr().out)
  assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("args, match", [
    (["--prompt=x", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--prompt=" + "x" * 30, "--max_new_tokens=4"], "prompt longer than the model's context"),
    (["--prompt=" + "x" * 31], "prompt longer than the model's context"),
    (["--prompt=x", "--temperature=-1"], "temperature must be a number >= 0"),
    (["--prompt=x", "--top_p=2"], r"top_p must be in \(0, 1\]"),
])
def test_sample_bad_flags(lm_run, capsys, args, match):
  assert cli.main(["sample", f"--workdir={lm_run[0]}", *args]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("kdlab: error: ")
  assert re.search(match, err), err


def test_sample_bad_runs(tmp_path, capsys, lm_run):
  assert cli.main(["sample", f"--workdir={tmp_path / 'nothing'}", "--prompt=x"]) == 2
  assert "no run at" in capsys.readouterr().err
  (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "resnet8", "num_classes": 10}}))
  assert cli.main(["sample", f"--workdir={tmp_path}", "--prompt=x"]) == 2
  assert "is not a language-model run" in capsys.readouterr().err
  (tmp_path / "config.json").write_text(json.dumps({"model": LM}))
  assert cli.main(["sample", f"--workdir={tmp_path}", "--prompt=x"]) == 2  # no checkpoint yet
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no checkpoint directory" in err
  shutil.copytree(lm_run[0] / "checkpoints", tmp_path / "checkpoints")  # saved with d_model 32
  (tmp_path / "config.json").write_text(json.dumps({"model": {**LM, "d_model": 16}}))
  assert cli.main(["sample", f"--workdir={tmp_path}", "--prompt=x"]) == 2
  assert "does not match its config.model" in capsys.readouterr().err
