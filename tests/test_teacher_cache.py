"""Teacher-output cache: round trip, k = V equals live KD, fingerprints, atomic builds, CLI errors."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab import cli
from kdlab.data import teacher_cache
from kdlab.offline.cache_teacher import cache_teacher
from kdlab.train import teachers as teacherlib
from kdlab.data import text
from kdlab.errors import UserError
from kdlab.losses import sequence
from kdlab.models import registry
from kdlab.objective import ModelOutput, Shapes, StepInputs, build

from conftest import ROOT, random_gpt_run

V, L = 256, 16
TEACHER = dict(name="gpt", vocab_size=V, d_model=32, num_layers=1, num_heads=2, max_len=32)


def _apply_fn(seed: int = 0, **overrides):
  """A randomly initialized GPT as ``tokens [B, L] -> logits [B, L, V]`` (variables as arguments)."""
  cfg = {**TEACHER, **overrides}
  model = registry.create(cfg.pop("name"), seed=seed, **cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, tokens):
    return nnx.merge(graphdef, state)(tokens, train=False)[0]

  return functools.partial(logits, state)


@pytest.fixture(scope="module")
def dataset():
  return text.pysrc("train", seq_len=L, max_bytes=1500)  # 94 sequences, the last one padded


@pytest.fixture(scope="module")
def teacher():
  return _apply_fn(0)


def _float64_log_softmax(apply_fn, tokens):
  logp = np.asarray(apply_fn(tokens), np.float64)
  logp = logp - logp.max(-1, keepdims=True)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def _check_is_topk(got, logp, k):
  """``got`` holds the k most likely tokens of ``logp`` (ties within 1e-6 either way), sorted, with
  their log-probabilities, and the log of the exact mass of the other tokens."""
  idx, values, rest = got["cache/topk_indices"], got["cache/topk_logprobs"], got["cache/rest_logprobs"]
  assert idx.shape == logp.shape[:-1] + (k,)
  assert np.all(np.sort(idx, -1)[..., 1:] != np.sort(idx, -1)[..., :-1])  # distinct
  assert np.all(np.diff(values, axis=-1) <= 0)  # most likely first
  np.testing.assert_allclose(values, np.take_along_axis(logp, idx, -1), rtol=1e-6, atol=1e-6)
  outside = np.ones(logp.shape, bool)
  np.put_along_axis(outside, idx, False, -1)
  if k < logp.shape[-1]:
    assert np.all(values[..., -1] >= np.where(outside, logp, -np.inf).max(-1) - 1e-6)
  with np.errstate(divide="ignore"):
    want_rest = np.log(np.where(outside, np.exp(logp), 0.0).sum(-1))
  np.testing.assert_allclose(rest, want_rest, rtol=1e-6, atol=1e-6)


def test_round_trip_across_shards(tmp_path, dataset, teacher):
  k = 8
  meta, built = teacher_cache.build_cache(teacher, dataset, k=k, out_dir=tmp_path / "c", fingerprint="fp",
                                          batch_size=8, shard_size=20)  # shards cut batches; last batch padded
  assert built and meta["num_sequences"] == len(dataset) == 94 and meta["num_shards"] == 5
  assert meta["vocab_size"] == V and meta["seq_len"] == L and meta["k"] == k
  assert np.load(tmp_path / "c" / "shard-00004" / "topk_indices.npy").dtype == np.uint16  # V <= 65536
  cache = teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp")
  idx = np.random.default_rng(0).permutation(len(dataset))[:40]
  idx[:3] = [19, 20, 93]  # both sides of a shard boundary, and the last (padded) sequence
  got = cache.lookup(idx)
  assert got["cache/topk_logprobs"].dtype == np.float32 and got["cache/topk_logprobs"].shape == (40, L, k)
  assert got["cache/topk_indices"].dtype == np.int32 and got["cache/rest_logprobs"].shape == (40, L)
  _check_is_topk(got, _float64_log_softmax(teacher, dataset.tokens[idx]), k)
  # The distribution stays normalized: top-k mass + rest mass = 1.
  total = np.exp(got["cache/topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(got["cache/rest_logprobs"])
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  with pytest.raises(IndexError):
    cache.lookup(np.array([94]))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_kd_from_a_full_vocab_cache_equals_kd_with_the_live_teacher(tmp_path, dataset, teacher, temperature):
  """k = V: values and gradients, with the cache's rest mass (-inf) and without it (the
  test_sequence_losses copy of this check is merged here)."""
  teacher_cache.build_cache(teacher, dataset, k=V, out_dir=tmp_path / "c", fingerprint="fp", batch_size=8,
                            shard_size=32)
  idx = np.array([3, 40, 77, 93])
  cached = teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp").lookup(idx)
  assert np.all(cached["cache/rest_logprobs"] == -np.inf)
  mask = jnp.asarray(dataset.mask[idx])  # the last sequence is padded
  t_logits = teacher(dataset.tokens[idx])
  s_logits = 3.0 * jax.random.normal(jax.random.key(1), t_logits.shape)

  def per_sequence(s, rest):
    return sequence.topk_kd(s, cached["cache/topk_logprobs"], cached["cache/topk_indices"], mask,
                            temperature=temperature, rest_logprobs=rest)

  def live(s):
    return sequence.token_loss("kd", s, t_logits, mask, temperature=temperature)

  live_grad = jax.jit(jax.grad(lambda s: live(s).sum()))(s_logits)
  assert np.abs(np.asarray(live_grad)).max() > 1e-3
  for rest in (cached["cache/rest_logprobs"], None):
    np.testing.assert_allclose(per_sequence(s_logits, rest), live(s_logits), rtol=1e-5, atol=1e-6)
    cached_grad = jax.jit(jax.grad(lambda s: per_sequence(s, rest).sum()))(s_logits)
    np.testing.assert_allclose(cached_grad, live_grad, rtol=1e-5, atol=1e-9)


def _lm_shapes(b, k, with_cache=True, logits_shape=None):
  out = ModelOutput(jax.ShapeDtypeStruct(logits_shape or (b, L, V), jnp.float32), {})
  batch = {"tokens": jax.ShapeDtypeStruct((b, L), jnp.int32), "token_mask": jax.ShapeDtypeStruct((b, L), jnp.float32),
           "index": jax.ShapeDtypeStruct((b,), jnp.int32), "mask": jax.ShapeDtypeStruct((b,), jnp.bool_)}
  if with_cache:
    batch.update({"cache/topk_logprobs": jax.ShapeDtypeStruct((b, L, k), jnp.float32),
                  "cache/topk_indices": jax.ShapeDtypeStruct((b, L, k), jnp.int32),
                  "cache/rest_logprobs": jax.ShapeDtypeStruct((b, L), jnp.float32)})
  return Shapes(out, [], [], 100, batch)


def test_topk_kd_term_reads_the_cache_entries(tmp_path, dataset, teacher):
  k = 8
  teacher_cache.build_cache(teacher, dataset, k=k, out_dir=tmp_path / "c", fingerprint="fp", batch_size=8,
                            shard_size=64)
  idx = np.array([0, 1, 93])
  batch = {"token_mask": jnp.asarray(dataset.mask[idx]), "mask": jnp.ones(3, bool),
           **teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp").lookup(idx)}
  s_logits = jax.random.normal(jax.random.key(2), (3, L, V))
  objective = build([dict(loss="topk_kd", weight=1.0, temperature=2.0)], _lm_shapes(3, k), nnx.Rngs(0))
  inputs = StepInputs(ModelOutput(s_logits, {}), [], batch, jnp.zeros((), jnp.int32), jax.random.key(0))
  loss, metrics, _ = objective({}, inputs, {})
  want = sequence.topk_kd(s_logits, batch["cache/topk_logprobs"], batch["cache/topk_indices"], batch["token_mask"],
                          temperature=2.0, rest_logprobs=batch["cache/rest_logprobs"])
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  assert "distill/topk_kd" in metrics


@pytest.mark.parametrize("shapes, message", [
    (_lm_shapes(2, 4, logits_shape=(2, V)), "needs a language model's"),
    (_lm_shapes(2, 4, with_cache=False), "set config.teacher_cache"),
    (_lm_shapes(2, V + 1), "k=257"),
])
def test_topk_kd_term_bad_input(shapes, message):
  with pytest.raises(UserError, match=message):
    build([dict(loss="topk_kd", weight=1.0)], shapes, nnx.Rngs(0))


@pytest.mark.parametrize("k", [0, V + 1, 2.5])
def test_bad_k_is_refused_before_writing(tmp_path, dataset, teacher, k):
  with pytest.raises(UserError, match="config.teacher_cache_k"):
    teacher_cache.build_cache(teacher, dataset, k=k, out_dir=tmp_path / "c", fingerprint="fp", batch_size=8,
                              shard_size=20)
  assert not (tmp_path / "c").exists()


def test_interrupted_build_is_rejected_then_resumed(tmp_path, dataset, teacher):
  calls = []

  def dies_on_sixth_call(tokens):  # shard 0 (four batches of 8) is written, shard 1 is not
    if isinstance(tokens, np.ndarray):  # not the abstract trace of the start-up checks
      calls.append(1)
      if len(calls) == 6:
        raise KeyboardInterrupt
    return teacher(tokens)

  out = tmp_path / "c"
  with pytest.raises(KeyboardInterrupt):
    teacher_cache.build_cache(dies_on_sixth_call, dataset, k=8, out_dir=out, fingerprint="fp", batch_size=8,
                              shard_size=32)
  assert (out / "shard-00000").is_dir() and not (out / "meta.json").exists()
  with pytest.raises(UserError, match=r"config.teacher_cache=.*interrupted build.*kdlab cache-teacher"):
    teacher_cache.open_cache(out, expected_fingerprint="fp")
  kept = (out / "shard-00000" / "topk_logprobs.npy").stat().st_mtime_ns
  meta, built = teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="fp", batch_size=8,
                                          shard_size=32)
  assert built and (out / "shard-00000" / "topk_logprobs.npy").stat().st_mtime_ns == kept  # not recomputed
  assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-00000", "shard-00001", "shard-00002"]
  teacher_cache.build_cache(teacher, dataset, k=8, out_dir=tmp_path / "fresh", fingerprint="fp", batch_size=8,
                            shard_size=32)
  everything = np.arange(len(dataset))
  resumed = teacher_cache.open_cache(out, expected_fingerprint="fp").lookup(everything)
  fresh = teacher_cache.open_cache(tmp_path / "fresh", expected_fingerprint="fp").lookup(everything)
  for key in teacher_cache.KEYS:
    np.testing.assert_array_equal(resumed[key], fresh[key])


def test_existing_directories(tmp_path, dataset, teacher):
  out = tmp_path / "c"
  teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="a=1;k=8", batch_size=8,
                            shard_size=50)
  before = (out / "meta.json").read_text()
  meta, built = teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="a=1;k=8",
                                          batch_size=8, shard_size=50)
  assert not built and (out / "meta.json").read_text() == before  # the same cache: reused, untouched
  with pytest.raises(UserError, match=r"another teacher.*differs in a\)"):
    teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="a=2;k=8", batch_size=8,
                              shard_size=50)
  with pytest.raises(UserError, match=r"differs in k\);.*kdlab cache-teacher"):
    teacher_cache.open_cache(out, expected_fingerprint="a=1;k=9")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty and holds no teacher cache"):
    teacher_cache.build_cache(teacher, dataset, k=8, out_dir=tmp_path / "other", fingerprint="f", batch_size=8,
                              shard_size=50)
  assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
  with pytest.raises(UserError, match="no finished cache"):
    teacher_cache.open_cache(tmp_path / "missing", expected_fingerprint="f")


# --- fingerprints and the cache-teacher command (teacher checkpoints on disk) ----------------------

def _save_teacher(root: pathlib.Path, seed: int, *, sharpen: float = 1.0, **overrides) -> str:
  """A finished-run layout: ``root/config.json`` (the model) and ``root/checkpoints/`` (orbax).

  ``sharpen`` scales the (tied) embedding, hence the logits: at init they are nearly uniform.
  """
  return str(random_gpt_run(root, sharpen=sharpen, seed=seed, **{**TEACHER, **overrides}))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  return {"a": _save_teacher(root / "a", 0), "b": _save_teacher(root / "b", 1),
          "v300": _save_teacher(root / "v300", 0, vocab_size=300)}


def _config(init: str, **data) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mesh = [("data", -1)]
  c.data = ml_collections.ConfigDict({**dict(source="pysrc", seq_len=L, max_bytes=1500, eval_max_bytes=600,
                                                batch_size=8, eval_batch_size=8), **data})
  c.teachers = [dict(init=init)]
  c.teacher_cache = ""
  c.teacher_cache_k = 8
  return c


def test_fingerprint_names_teacher_tokenizer_data_and_k(teachers):
  base = _config(teachers["a"])
  fp = teacherlib.fingerprint(base)
  assert fp == teacherlib.fingerprint(_config(teachers["a"])) and fp.startswith("teacher=")
  student = _config(teachers["a"])  # a student's config: its own model and objective, the same teacher and data
  student.model = dict(name="gpt", vocab_size=V, d_model=16, num_layers=1, num_heads=2, max_len=32)
  student.objective = [dict(loss="topk_kd", weight=1.0)]
  student.teacher_cache = "/some/cache"
  assert teacherlib.fingerprint(student) == fp

  def differs(config):
    return teacher_cache._differing(teacherlib.fingerprint(config), fp)

  assert differs(_config(teachers["b"])) == ["teacher"]  # same architecture, other weights
  assert differs(_config(teachers["v300"])) == ["teacher", "tokenizer"]
  # Another tokenizer also tokenizes the text differently.
  chatml = ROOT / "tests" / "fixtures" / "hf_tokenizer" / "chatml"
  assert differs(_config(teachers["a"], tokenizer=f"hf:{chatml}")) == ["tokenizer", "data"]
  assert differs(_config(teachers["a"], seq_len=12)) == ["data"]
  assert differs(_config(teachers["a"], max_bytes=1400)) == ["data"]
  other_k = _config(teachers["a"])
  other_k.teacher_cache_k = 4
  assert differs(other_k) == ["k"]


def test_cache_teacher_then_open_from_student_config(tmp_path, teachers, capsys):
  config_file = tmp_path / "lm.py"
  config_file.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.mesh = [('data', -1)]\n"
      f"  c.data = ml_collections.ConfigDict(dict(source='pysrc', seq_len={L}, max_bytes=1500, eval_max_bytes=600,"
      " batch_size=8, eval_batch_size=8))\n"
      f"  c.teachers = [dict(init={teachers['a']!r})]\n"
      "  c.teacher_cache = ''\n"
      "  c.teacher_cache_k = 8\n"
      "  return c\n")
  out = tmp_path / "cache"
  assert cli.main(["cache-teacher", f"--config={config_file}", f"--out={out}", "--no-progress",
                   "--shard-size=40"]) == 0
  assert "teacher cache built: 94 sequences x 16 tokens, top 8 of 256" in capsys.readouterr().out
  student = _config(teachers["a"])
  cache = teacher_cache.open_cache(out, expected_fingerprint=teacherlib.fingerprint(student))
  got = cache.lookup(np.array([5, 93]))
  dataset = text.pysrc("train", seq_len=L, max_bytes=1500)
  live = _apply_fn(0)  # the same weights as the saved teacher "a"
  _check_is_topk(got, _float64_log_softmax(live, dataset.tokens[[5, 93]]), 8)
  assert cli.main(["cache-teacher", f"--config={config_file}", f"--out={out}", "--no-progress"]) == 0
  assert "already exists" in capsys.readouterr().out
  with pytest.raises(UserError, match=r"differs in teacher"):
    teacher_cache.open_cache(out, expected_fingerprint=teacherlib.fingerprint(_config(teachers["b"])))

  for args, message in [
      (["--config.teacher_cache_k=300"], "config.teacher_cache_k=300: must be an int in [1, 256]"),
      (["--config.teacher_cache_k=0"], "config.teacher_cache_k=0: must be an int >= 1"),
      (["--config.data.seq_len=64"], "config.data.seq_len=64 exceeds"),
      (["--config.teachers[0].init=/nonexistent/checkpoints"], "config.teachers[0].init: no teacher checkpoint"),
  ]:
    code = cli.main(["cache-teacher", f"--config={config_file}", f"--out={tmp_path / 'bad'}", "--no-progress",
                     *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "bad").exists()


def test_training_from_a_full_vocab_cache_equals_training_with_the_live_teacher(tmp_path):
  """configs/lm_pysrc.py quick: ``kd-cached`` at k = V and ``kd`` give the same losses and parameters."""
  from kdlab.config import apply_overrides, load
  from kdlab.train.checkpoint import load_student_variables
  from kdlab.train.loop import train
  from conftest import ROOT, read_jsonl
  init = _save_teacher(tmp_path / "teacher", 2, sharpen=100.0)
  lm = str(ROOT / "configs" / "lm_pysrc.py")
  # ce=0: the divergence alone, so the comparison is of the cached and the live teacher terms only.
  common = f"quick,steps=3,teacher={init},cache={tmp_path / 'cache'},ce=0"
  cached = apply_overrides(load(f"{lm}:kd-cached,k={V},{common}"), ["--config.objective[0].temperature=2.0"])
  live = apply_overrides(load(f"{lm}:kd,{common}"), ["--config.objective[0].temperature=2.0"])
  cache_teacher(cached, tmp_path / "cache")
  for config, name in ((cached, "cached"), (live, "live")):
    config.train.log_every_steps = 1
    config.train.eval_every_epochs = config.train.checkpoint_every_epochs = 100.0  # only at the end
    train(config, tmp_path / name, use_wandb=False, progress=False)
  logs = {name: [m for m in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in m] for name in ("cached", "live")}
  assert len(logs["cached"]) == len(logs["live"]) == 3
  for a, b in zip(logs["cached"], logs["live"]):
    assert a["distill/topk_kd"] > 0.1  # a peaked teacher: a real signal, not float noise
    np.testing.assert_allclose(a["distill/topk_kd"], b["distill/kd"], rtol=1e-5)
    np.testing.assert_allclose(a["l2_grads"], b["l2_grads"], rtol=1e-5)
  params = {name: load_student_variables(tmp_path / name / "checkpoints", name)[0] for name in ("cached", "live")}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params["cached"], params["live"])


def test_kdlab_train_refuses_a_cache_built_for_another_teacher_data_or_k(tmp_path, teachers, capsys):
  """configs/lm_pysrc.py:kd-cached through ``kdlab train``: one line naming what differs; nothing written."""
  from kdlab.config import load
  from conftest import ROOT, tree_snapshot
  lm, cache = str(ROOT / "configs" / "lm_pysrc.py"), tmp_path / "cache"
  cache_teacher(load(f"{lm}:kd-cached,quick,k=8,teacher={teachers['a']},cache={cache}"), cache)
  built = tree_snapshot(cache)
  for options, overrides, part in [(f"k=8,teacher={teachers['b']}", [], "teacher"),
                                   (f"k=4,teacher={teachers['a']}", [], "k"),
                                   (f"k=8,teacher={teachers['a']}", ["--config.data.max_bytes=8192"], "data")]:
    workdir = tmp_path / "run"
    code = cli.main(["train", f"--config={lm}:kd-cached,quick,{options},cache={cache}", f"--workdir={workdir}",
                     "--nowandb", "--no-progress", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: ") and len(err.strip().splitlines()) == 1, err
    assert f"config.teacher_cache={str(cache)!r}: built for another teacher, tokenizer, data or k " \
           f"(its fingerprint differs in {part})" in err, err
    assert not workdir.exists()
  assert tree_snapshot(cache) == built
