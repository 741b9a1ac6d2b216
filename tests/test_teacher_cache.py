"""Teacher-output cache: the compact format's round trip and bit packing, k = V equals live KD,
fingerprints, atomic builds, 2 processes writing one cache, CLI errors."""

from __future__ import annotations

import functools
import json
import pathlib
import socket
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab import cli
from kdlab.data import cache_codec, teacher_cache
from kdlab.offline.cache_teacher import cache_teacher
from kdlab.train import teachers as teacherlib
from kdlab.data import text
from kdlab.errors import UserError
from kdlab.losses import sequence
from kdlab.models import registry
from kdlab.objective import ModelOutput, Shapes, StepInputs, build

from conftest import ROOT, child_env, kdlab_cmd, random_gpt_run, run_child

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
  their log-probabilities and the log of the exact mass of the other tokens, within the format's
  error: half a grid step of each value and of the rest, both shifted by the renormalization."""
  enc = cache_codec.encoding(logp.shape[-1])
  atol = (enc.step + enc.rest_step) / 2 + 1e-6
  idx, values, rest = got["cache/topk_indices"], got["cache/topk_logprobs"], got["cache/rest_logprobs"]
  assert idx.shape == logp.shape[:-1] + (k,)
  assert np.all(np.sort(idx, -1)[..., 1:] != np.sort(idx, -1)[..., :-1])  # distinct
  assert np.all(np.diff(values, axis=-1) <= 0)  # most likely first
  want = np.take_along_axis(logp, idx, -1)
  assert np.all(want[..., 0] >= logp.max(-1) - 1e-6)
  reachable = want - want[..., :1] > -cache_codec.RANGE  # (further below the top-1 is raised to -RANGE)
  np.testing.assert_allclose(np.where(reachable, values, 0), np.where(reachable, want, 0), rtol=0, atol=atol)
  outside = np.ones(logp.shape, bool)
  np.put_along_axis(outside, idx, False, -1)
  if k < logp.shape[-1]:
    assert np.all(want[..., -1] >= np.where(outside, logp, -np.inf).max(-1) - 1e-6)
  with np.errstate(divide="ignore"):
    want_rest = np.log(np.where(outside, np.exp(logp), 0.0).sum(-1))
  np.testing.assert_allclose(rest, want_rest, rtol=0, atol=atol)
  # The distribution stays normalized: top-k mass + rest mass = 1.
  total = np.exp(values.astype(np.float64)).sum(-1) + np.exp(rest.astype(np.float64))
  np.testing.assert_allclose(total, 1.0, atol=1e-5)


def _kl_to_decoded(got, logp):
  """Per token KL(exact top-k + rest || decoded) in float64, over the k + 1 categories, ``[...]``."""
  idx = got["cache/topk_indices"]
  outside = np.ones(logp.shape, bool)
  np.put_along_axis(outside, idx, False, -1)
  with np.errstate(divide="ignore"):
    rest = np.log(np.where(outside, np.exp(logp), 0.0).sum(-1))
  want = np.concatenate([np.take_along_axis(logp, idx, -1), rest[..., None]], -1)
  got = np.concatenate([got["cache/topk_logprobs"], got["cache/rest_logprobs"][..., None]], -1).astype(np.float64)
  got = got - np.log(np.exp(got).sum(-1, keepdims=True))  # (float32 sums to 1 within ~1e-7: more than the KL)
  p = np.exp(want)
  with np.errstate(invalid="ignore"):
    d = np.where(p > 0, want - got, 0.0)
  return np.sum(np.where(p > 0, p * (np.expm1(-d) + d), 0.0), -1)  # each term >= 0: no cancellation


def test_round_trip_across_shards(tmp_path, dataset, teacher):
  k = 8
  meta, built = teacher_cache.build_cache(teacher, dataset, k=k, out_dir=tmp_path / "c", fingerprint="fp",
                                          batch_size=8, shard_size=20)  # shards cut batches; last batch padded
  assert built and meta["num_sequences"] == len(dataset) == 94 and meta["num_shards"] == 5
  assert meta["vocab_size"] == V and meta["seq_len"] == L and meta["k"] == k and meta["version"] == 2
  # V = 256: 8-bit ids and 16-bit values, 3 bytes per entry; a sequence's L x k entries packed in one row.
  assert meta["encoding"]["entry_bits"] == 24 and meta["bytes_per_entry"] == 3
  entries = np.load(tmp_path / "c" / "shard-000-00004" / "entries.npy")
  assert entries.dtype == np.uint8 and entries.shape == (94 - 80, L * k * 3)
  files = [f for f in (tmp_path / "c").rglob("*.npy")]
  assert meta["bytes_per_token"] == sum(f.stat().st_size for f in files) / (94 * L)
  cache = teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp")
  idx = np.random.default_rng(0).permutation(len(dataset))[:40]
  idx[:3] = [19, 20, 93]  # both sides of a shard boundary, and the last (padded) sequence
  got = cache.lookup(idx)
  assert got["cache/topk_logprobs"].dtype == np.float32 and got["cache/topk_logprobs"].shape == (40, L, k)
  assert got["cache/topk_indices"].dtype == np.int32 and got["cache/rest_logprobs"].shape == (40, L)
  _check_is_topk(got, _float64_log_softmax(teacher, dataset.tokens[idx]), k)
  with pytest.raises(IndexError):
    cache.lookup(np.array([94]))


@pytest.mark.parametrize("k, sharpen", [(64, 1.0), (64, 30.0), (V, 1.0), (V, 30.0)])
def test_compact_round_trip_error(tmp_path, dataset, teacher, k, sharpen):
  """Every sequence decoded: the float32 top-k within the stated error, the KL to it far below 1e-3
  nats per token (about step^2 / 24), and equal to the KL the build measured and recorded."""
  def apply_fn(tokens):
    return sharpen * teacher(tokens)  # sharpened: values down to far below the top-1, rest mass tiny

  meta, _ = teacher_cache.build_cache(apply_fn, dataset, k=k, out_dir=tmp_path / "c", fingerprint="fp",
                                      batch_size=8, shard_size=32)
  got = teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp").lookup(np.arange(len(dataset)))
  logp = _float64_log_softmax(apply_fn, dataset.tokens)
  _check_is_topk(got, logp, k)
  if k == V:
    assert np.all(got["cache/rest_logprobs"] == -np.inf)
  kl = _kl_to_decoded(got, logp)
  step = cache_codec.encoding(V).step
  assert kl.max() < step**2 and kl.mean() < 1e-3
  np.testing.assert_allclose(meta["reconstruction_kl"], kl.mean(), rtol=0.02)
  # 3 bytes per kept entry, the rest mass in the top-1's slot; + a float64 KL per sequence and .npy headers.
  assert 3 * k < meta["bytes_per_token"] < 3 * k + 2


@pytest.mark.parametrize("n, spans", [(45, ((0, 8),)), (45, ((3, 8), (0, 3))), (94, ((0, 4), (4, 8))),
                                       (3, ((0, 4), (4, 8)))])
def test_layout_places_every_sequence_once(n, spans):
  """Parts written in batch order (each its rows of every batch of 8, in shards of 5) and the reader's
  ``locate`` agree, for unequal and unordered spans and a part left without sequences."""
  layout = teacher_cache.Layout(n, 8, spans, 5)
  written = {p: [] for p in range(len(spans))}
  for j in range(-(-n // 8)):
    for p, (lo, hi) in enumerate(spans):
      written[p] += [i for i in range(j * 8 + lo, j * 8 + hi) if i < n]
  where = {i: (p, local // 5, local % 5) for p, seqs in written.items() for local, i in enumerate(seqs)}
  assert sorted(where) == list(range(n))
  part, shard, row = layout.locate(np.arange(n))
  assert list(zip(part.tolist(), shard.tolist(), row.tolist())) == [where[i] for i in range(n)]
  for p in range(len(spans)):
    assert layout.count(p) == len(written[p])
    assert layout.shards(p) == [(a, min(a + 5, len(written[p]))) for a in range(0, len(written[p]), 5)]


@pytest.mark.parametrize("vocab", [256, 65536, 65537, 128256])
def test_bit_packing_round_trip(vocab):
  bits = int(np.ceil(np.log2(vocab)))
  rng = np.random.default_rng(vocab)
  for shape in [(5, 64), (3, 2, 33), (1, 1)]:
    ids = rng.integers(0, vocab, shape, dtype=np.int64)
    ids.flat[0] = vocab - 1
    packed = cache_codec.pack_bits(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] * bits // 8))
    np.testing.assert_array_equal(cache_codec.unpack_bits(packed, bits, shape[-1]), ids)
  enc = cache_codec.encoding(vocab)
  assert enc.id_bits == bits and enc.entry_bits == min(32, bits + 16) and enc.value_bits >= 15
  fields = (rng.integers(0, vocab, (4, 50)).astype(np.uint32) << enc.value_bits) | rng.integers(
      0, enc.max_code + 1, (4, 50)).astype(np.uint32)
  np.testing.assert_array_equal(cache_codec.unpack_bits(cache_codec.pack_bits(fields, enc.entry_bits),
                                                        enc.entry_bits, 50), fields)


def test_llama3_vocab_fits_4_bytes_per_entry_within_the_kl_target():
  """V = 128256 at k = 64: 17-bit ids + 15-bit values = 256 bytes per token, the rest mass included;
  on Zipf-like logits (a long tail holding real mass) the KL to the float32 top-k stays ~1e-8."""
  enc = cache_codec.encoding(128256)
  assert (enc.id_bits, enc.value_bits) == (17, 15)
  assert cache_codec.row_bytes(64, enc.entry_bits) == 256
  rank = jax.random.permutation(jax.random.key(0), 128256) + 1.0
  logits = -1.1 * jnp.log(rank)[None, None] + jax.random.normal(jax.random.key(1), (2, 4, 128256))
  values, indices, rest = teacher_cache._topk(logits, 64)
  fields, kl = jax.jit(cache_codec.encode, static_argnums=3)(values, indices, rest, enc)
  packed = cache_codec.pack_bits(np.asarray(fields).reshape(8, 64), enc.entry_bits)
  assert packed.shape == (8, 256)
  logprobs, ids, rest_got = cache_codec.decode(cache_codec.unpack_bits(packed, 32, 64).reshape(2, 4, 64), enc)
  np.testing.assert_array_equal(ids, indices)
  assert np.all(np.exp(rest) > 0.3)  # a long tail: the rest mass matters
  got = {"cache/topk_logprobs": logprobs, "cache/topk_indices": ids, "cache/rest_logprobs": rest_got}
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
  want_kl = _kl_to_decoded(got, logp)
  assert want_kl.max() < enc.step**2 < 1e-3
  np.testing.assert_allclose(kl, want_kl, rtol=0.02)


def _kd_error_bound(live_loss, temperature, step):
  """How far ``T^2 KL(q_t || q_s)`` (per token, or a mean of tokens) can move when every teacher
  log-probability moves by at most ``step`` (the cache's error at k = V: half a step of its own,
  half a step of renormalization).

  Tempered, ``log q_t`` moves by at most ``2 step / T``, so ``|dq_i| <= (2 step / T) q_i`` (first
  order) and ``|dL| <= T^2 sum_i |dq_i| |log(q_t,i / q_s,i)| <= 2 step T (KL + 2)``: the tokens
  where ``q_t < q_s`` add at most ``sum q_s - q_t <= 1`` twice (``x log(x / y) >= x - y``).
  """
  return 1.05 * 2 * step * (np.asarray(live_loss) / temperature + 2 * temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_kd_from_a_full_vocab_cache_equals_kd_with_the_live_teacher(tmp_path, dataset, teacher, temperature):
  """k = V: values and gradients, with the cache's rest mass (-inf) and without it, within the
  cache's quantization error (:func:`_kd_error_bound`; gradients: ``2 step q_t / tokens`` per logit)."""
  teacher_cache.build_cache(teacher, dataset, k=V, out_dir=tmp_path / "c", fingerprint="fp", batch_size=8,
                            shard_size=32)
  idx = np.array([3, 40, 77, 93])
  cached = teacher_cache.open_cache(tmp_path / "c", expected_fingerprint="fp").lookup(idx)
  assert np.all(cached["cache/rest_logprobs"] == -np.inf)
  mask = jnp.asarray(dataset.mask[idx])  # the last sequence is padded
  t_logits = teacher(dataset.tokens[idx])
  s_logits = 3.0 * jax.random.normal(jax.random.key(1), t_logits.shape)
  step = cache_codec.encoding(V).step

  def per_sequence(s, rest):
    return sequence.topk_kd(s, cached["cache/topk_logprobs"], cached["cache/topk_indices"], mask,
                            temperature=temperature, rest_logprobs=rest)

  def live(s):
    return sequence.token_loss("kd", s, t_logits, mask, temperature=temperature)

  live_grad = jax.jit(jax.grad(lambda s: live(s).sum()))(s_logits)
  assert np.abs(np.asarray(live_grad)).max() > 1e-3
  # d/ds of T^2 KL(q_t || q_s) / n is T (q_s - q_t) / n: it moves by T |dq_t| / n <= 2 step q_t / n.
  q_t = jax.nn.softmax(t_logits / temperature, axis=-1)
  grad_bound = 1.05 * 2 * step * q_t * mask[..., None] / jnp.maximum(mask.sum(-1), 1)[:, None, None] + 1e-9
  for rest in (cached["cache/rest_logprobs"], None):
    got, want = per_sequence(s_logits, rest), live(s_logits)
    assert np.all(np.abs(got - want) <= _kd_error_bound(want, temperature, step))
    assert not np.allclose(got, want, rtol=1e-7, atol=0)  # the bound is not vacuous: the values do differ
    cached_grad = jax.jit(jax.grad(lambda s: per_sequence(s, rest).sum()))(s_logits)
    assert np.all(np.abs(cached_grad - live_grad) <= grad_bound)


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
  assert (out / "shard-000-00000").is_dir() and not (out / "meta.json").exists()
  with pytest.raises(UserError, match=r"config.teacher_cache=.*interrupted build.*kdlab cache-teacher"):
    teacher_cache.open_cache(out, expected_fingerprint="fp")
  kept = (out / "shard-000-00000" / "entries.npy").stat().st_mtime_ns
  meta, built = teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="fp", batch_size=8,
                                          shard_size=32)
  assert built and (out / "shard-000-00000" / "entries.npy").stat().st_mtime_ns == kept  # not recomputed
  assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-000-00000", "shard-000-00001",
                                                   "shard-000-00002"]
  fresh_meta, _ = teacher_cache.build_cache(teacher, dataset, k=8, out_dir=tmp_path / "fresh", fingerprint="fp",
                                            batch_size=8, shard_size=32)
  assert meta["reconstruction_kl"] == fresh_meta["reconstruction_kl"]  # kept shards keep their measured KL
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


def test_an_old_format_cache_is_one_line_error(tmp_path, dataset, teacher):
  """A version-1 cache (float32 values): training and building both say to rebuild; nothing written."""
  out = tmp_path / "old"
  teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="fp", batch_size=8, shard_size=50)
  meta = json.loads((out / "meta.json").read_text())
  (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))
  before = sorted(p.name for p in out.rglob("*"))
  with pytest.raises(UserError, match=r"^config.teacher_cache=.*format version 1, this kdlab reads version 2; "
                                      r"rebuild it with kdlab cache-teacher") as e:
    teacher_cache.open_cache(out, expected_fingerprint="fp")
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"^--out=.*format version 1 .*; delete it or choose a new --out"):
    teacher_cache.build_cache(teacher, dataset, k=8, out_dir=out, fingerprint="fp", batch_size=8, shard_size=50)
  assert sorted(p.name for p in out.rglob("*")) == before


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
  with pytest.raises(UserError, match=r"^config.data.teacher_tokenizer='hf:/t': a teacher cache holds .*; unset it"):
    teacherlib.fingerprint(_config(teachers["a"], teacher_tokenizer="hf:/t"))


def _config_file(tmp_path: pathlib.Path, init: str) -> pathlib.Path:
  """A config file for ``kdlab cache-teacher``: teacher ``init``, pysrc text, k = 8, batches of 8."""
  config_file = tmp_path / "lm.py"
  config_file.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.mesh = [('data', -1)]\n"
      f"  c.data = ml_collections.ConfigDict(dict(source='pysrc', seq_len={L}, max_bytes=1500, eval_max_bytes=600,"
      " batch_size=8, eval_batch_size=8))\n"
      f"  c.teachers = [dict(init={init!r})]\n"
      "  c.teacher_cache = ''\n"
      "  c.teacher_cache_k = 8\n"
      "  return c\n")
  return config_file


def test_cache_teacher_then_open_from_student_config(tmp_path, teachers, capsys):
  config_file = _config_file(tmp_path, teachers["a"])
  out = tmp_path / "cache"
  assert cli.main(["cache-teacher", f"--config={config_file}", f"--out={out}", "--no-progress",
                   "--shard-size=40"]) == 0
  printed = capsys.readouterr().out
  meta = json.loads((out / "meta.json").read_text())
  assert f"teacher cache built: 94 sequences x 16 tokens, top 8 of 256, in {out}; " \
         f"{meta['bytes_per_token']:.1f} bytes per token (3 per kept entry), reconstruction KL " \
         f"{meta['reconstruction_kl']:.2e} nats per token" in printed, printed
  assert 24 < meta["bytes_per_token"] < 26 and 0 < meta["reconstruction_kl"] < 1e-6
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
      (["--num_processes=2"], "--coordinator_address, --process_id: missing"),
  ]:
    code = cli.main(["cache-teacher", f"--config={config_file}", f"--out={tmp_path / 'bad'}", "--no-progress",
                     *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "bad").exists()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_cache_that_one_process_writes(tmp_path, teachers):
  """``kdlab cache-teacher`` as 2 processes x 4 CPU devices on 127.0.0.1 (each writes the shards of its
  half of every batch; process 0 writes meta.json and prints) against 1 process x 8 devices: the
  same decoded values, byte for byte, and the same measured KL."""
  args = ["cache-teacher", f"--config={_config_file(tmp_path, teachers['a'])}", "--no-progress", "--shard-size=10"]
  run_child(kdlab_cmd(*args, f"--out={tmp_path / 'one'}"), devices=8)
  port = _free_port()
  procs = [subprocess.Popen(kdlab_cmd(*args, f"--out={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}", "--distributed_timeout=60"),
                            env=child_env(4), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "teacher cache built: 94 sequences" in outs[0][0] and "teacher cache" not in outs[1][0]
  one, two = (json.loads((tmp_path / name / "meta.json").read_text()) for name in ("one", "two"))
  assert one["parts"] == [[0, 8]] and two["parts"] == [[0, 4], [4, 8]] and two["created"]["processes"] == 2
  # 94 sequences in 12 batches of 8, the last one 6: process 0 holds 12 x 4, process 1 11 x 4 + 2.
  assert sorted(p.name for p in (tmp_path / "two").glob("shard-001-*")) == [f"shard-001-{s:05d}" for s in range(5)]
  assert len(list((tmp_path / "two").glob("shard-000-*"))) == 5 and len(list((tmp_path / "one").glob("shard-*"))) == 10
  everything = np.arange(94)
  got = {name: teacher_cache.open_cache(tmp_path / name, expected_fingerprint=one["fingerprint"]).lookup(everything)
         for name in ("one", "two")}
  for key in teacher_cache.KEYS:
    np.testing.assert_array_equal(got["two"][key], got["one"][key])
  np.testing.assert_allclose(two["reconstruction_kl"], one["reconstruction_kl"], rtol=1e-12)


def test_training_from_a_full_vocab_cache_equals_training_with_the_live_teacher(tmp_path):
  """configs/lm_pysrc.py quick: ``kd-cached`` at k = V and ``kd`` give the same losses (within the
  quantization error :func:`_kd_error_bound`) and gradient norms (within 2 grid steps, relative: the
  logits' gradient ``T (q_s - q_t) / n`` moves by at most ``2 step q_t / n``)."""
  from kdlab.config import apply_overrides, load
  from kdlab.train.loop import train
  from conftest import ROOT, read_jsonl
  init = _save_teacher(tmp_path / "teacher", 2, sharpen=100.0)
  lm = str(ROOT / "configs" / "lm_pysrc.py")
  # ce=0: the divergence alone, so the comparison is of the cached and the live teacher terms only.
  common = f"quick,steps=3,teacher={init},cache={tmp_path / 'cache'},ce=0"
  cached = apply_overrides(load(f"{lm}:kd-cached,k={V},{common}"), ["--config.objective[0].temperature=2.0"])
  live = apply_overrides(load(f"{lm}:kd,{common}"), ["--config.objective[0].temperature=2.0"])
  meta, _ = cache_teacher(cached, tmp_path / "cache")
  assert meta["reconstruction_kl"] < 1e-6
  for config, name in ((cached, "cached"), (live, "live")):
    config.train.log_every_steps = 1
    config.train.eval_every_epochs = config.train.checkpoint_every_epochs = 100.0  # only at the end
    train(config, tmp_path / name, use_wandb=False, progress=False)
  logs = {name: [m for m in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in m] for name in ("cached", "live")}
  assert len(logs["cached"]) == len(logs["live"]) == 3
  step = cache_codec.encoding(V).step
  for a, b in zip(logs["cached"], logs["live"]):
    assert a["distill/topk_kd"] > 0.1  # a peaked teacher: a real signal, not float noise
    assert abs(a["distill/topk_kd"] - b["distill/kd"]) <= _kd_error_bound(b["distill/kd"], 2.0, step)
    np.testing.assert_allclose(a["l2_grads"], b["l2_grads"], rtol=2 * step)


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
