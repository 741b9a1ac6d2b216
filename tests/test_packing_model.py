"""Packed rows in the decoders and the per-token normalization over the global batch.

Several examples share one row, told apart by ``segment_ids`` (0 = padding) with ``positions``
restarting at each example (kdlab/models/packing.py): each example's logits equal its own unpacked
forward (llama, qwen3 and gemma3 from the Hugging Face fixtures, gemma3 with its sliding window, and
gpt), no attention probability crosses segments, and RoPE follows the restarted positions.
``config.train.token_normalization="global"`` (kdlab/train/step.py) gives one mean per token over
the whole global batch: a packed batch's loss and update equal those of the same examples unpacked,
and they are the same for 1 and 4 microbatches (rows with uneven token counts) and for 1 and 8
devices; ``"sequence"`` keeps the mean of per-sequence means.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, run_child
from kdlab import losses, models
from kdlab.errors import UserError
from kdlab.losses import fused_head, sequence
from kdlab.models import from_pretrained
from kdlab.objective.terms import common
from kdlab.train import optim, ranges, tasks
from kdlab.train.state import Learner, init_state
from kdlab.train.step import Teacher, global_token_weights, make_train_step, objective_for, reduce_metrics

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
L = 16
GPT = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=2, max_len=L)
STEP_GPT = dict(GPT, num_layers=1)  # the train-step tests' student and teacher


def pack(lengths: list[int], length: int = L) -> tuple[np.ndarray, np.ndarray]:
  """``segment_ids`` and ``positions`` ``[length]`` of examples of ``lengths`` packed from the left."""
  seg, pos, start = np.zeros(length, np.int32), np.zeros(length, np.int32), 0
  for i, n in enumerate(lengths):
    seg[start:start + n], pos[start:start + n] = i + 1, np.arange(n)
    start += n
  return seg, pos


def decoder(name: str):
  if name == "gpt":
    return models.create("gpt", **GPT, seed=0)
  return from_pretrained(FIXTURES / name)


# --- the models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "gpt"])
def test_packed_forward_equals_each_example_alone(name):
  """Two examples in one row, then padding, give each example's own logits; gemma3's examples are
  longer than its sliding window (5), so the window is measured inside each example."""
  model = decoder(name)
  n = 6
  tokens = np.random.default_rng(0).integers(1, model.vocab_size, (1, L)).astype(np.int32)
  seg, pos = pack([n, n])
  logits, _ = model(jnp.asarray(tokens), train=False, segment_ids=jnp.asarray(seg[None]),
                    positions=jnp.asarray(pos[None]))
  assert np.all(np.isfinite(logits))  # the padding too
  alone, _ = model(jnp.asarray(tokens[0, :2 * n].reshape(2, n)), train=False)
  np.testing.assert_allclose(logits[0, :2 * n].reshape(2, n, -1), alone, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "gpt"])
def test_attention_probabilities_stay_inside_each_segment(name):
  model = decoder(name)
  seg, pos = pack([6, 7])
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, model.vocab_size, (1, L)), jnp.int32)
  _, feats = model(tokens, train=False, taps=("attn0", "attn1"), segment_ids=jnp.asarray(seg[None]),
                   positions=jnp.asarray(pos[None]))
  q, k = np.indices((L, L))
  same = (seg[q] == seg[k]) & (k <= q)
  for tap in ("attn0", "attn1"):
    probs = np.asarray(feats[tap])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[..., ~same] == 0), tap
  if name == "gemma3":  # layer 0 slides (window 5) inside each example
    window = same & (pos[k] > pos[q] - 5)
    probs = np.asarray(feats["attn0"])
    assert np.all(probs[..., ~window] == 0) and np.all(probs[..., window] > 0)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_rope_rotates_to_the_given_positions(name):
  """RoPE is relative, so inside a segment only position differences matter; across one segment
  whose positions restart midway (``positions`` without ``segment_ids``) the tokens after the
  restart see the earlier ones at other distances: their logits change, the earlier ones' do not."""
  model = decoder(name)
  if name == "gpt":  # sharper attention than its 0.02-std initialization, so that positions show in the logits
    for block in model.blocks:
      for proj in (block.attn.query, block.attn.key):
        proj.kernel[...] = proj.kernel[...] * 20
  _, pos = pack([5, 8])
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, model.vocab_size, (1, L)), jnp.int32)
  plain, _ = model(tokens, train=False)
  restarted, _ = model(tokens, train=False, positions=jnp.asarray(pos[None]))
  np.testing.assert_allclose(restarted[0, :5], plain[0, :5], atol=1e-5)
  assert float(jnp.min(jnp.max(jnp.abs(restarted[0, 6:13] - plain[0, 6:13]), axis=-1))) > 1e-4


def test_decoders_refuse_misshapen_segment_ids():
  model = decoder("gpt")
  with pytest.raises(ValueError, match="segment_ids: expected"):
    model(jnp.zeros((2, 8), jnp.int32), train=False, segment_ids=jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="positions: expected"):
    model(jnp.zeros((2, 8), jnp.int32), train=False, positions=jnp.ones((2, 8), jnp.float32))


# --- the losses with token weights ---------------------------------------------------------------

def test_token_losses_with_weights_are_weighted_sums():
  rng = np.random.default_rng(3)
  b, l, d, v = 3, 6, 4, 11
  s_h, t_h = rng.normal(size=(b, l, d)).astype(np.float32), rng.normal(size=(b, l, d)).astype(np.float32)
  s_w, t_w = rng.normal(size=(d, v)).astype(np.float32), rng.normal(size=(d, v)).astype(np.float32)
  s, t = s_h @ s_w, t_h @ t_w
  mask = (rng.random((b, l)) < 0.7).astype(np.float32)
  weights = mask * rng.random((b, l)).astype(np.float32) * 3
  per_token = np.asarray(losses.kd(jnp.asarray(s), jnp.asarray(t), temperature=2.0))
  expected = (weights * per_token).sum(-1)
  got = {"plain": sequence.token_loss("kd", s, t, mask, weights=weights, temperature=2.0),
         "chunked": sequence.chunked_token_kd(s, t, mask, chunk_size=4, weights=weights, temperature=2.0),
         "fused": fused_head.fused_token_kd(s_h, s_w, t_h, t_w, mask, chunk_size=4, weights=weights, temperature=2.0)}
  logp = jax.nn.log_softmax(jnp.asarray(t))
  got["topk"] = sequence.topk_kd(s, logp, jnp.broadcast_to(jnp.arange(v), (b, l, v)), mask, weights=weights)
  per_token_t1 = np.asarray(losses.kd(jnp.asarray(s), jnp.asarray(t)))
  for name, value in got.items():
    want = (weights * per_token_t1).sum(-1) if name == "topk" else expected
    np.testing.assert_allclose(np.asarray(value), want, rtol=1e-5, atol=1e-6, err_msg=name)
  # Gradients of the weighted fused loss (uneven cotangent too) match the plain one.
  g = jnp.asarray([1.0, 2.0, -0.5])
  plain = jax.grad(lambda h, w: jnp.sum(g * sequence.token_loss("kd", h @ w, t, mask, weights=weights)), (0, 1))
  fused = jax.grad(lambda h, w: jnp.sum(g * fused_head.fused_token_kd(h, w, t_h, t_w, mask, chunk_size=4,
                                                                       weights=weights)), (0, 1))
  for a, c in zip(plain(jnp.asarray(s_h), jnp.asarray(s_w)), fused(jnp.asarray(s_h), jnp.asarray(s_w))):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="weights: expected"):
    sequence.token_loss("kd", s, t, mask, weights=weights[:, :-1])


def test_query_means_rescale_to_the_global_token_mean():
  """attention_kl's mean over a row's real query positions, rescaled by ``sum_l token_weights``, is
  that row's share of the global per-token mean."""
  rng = np.random.default_rng(4)
  b, h, l = 4, 2, 5
  s = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, h, l, l)), jnp.float32))
  t = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, h, l, l)), jnp.float32))
  mask = np.ones((b, l), np.float32)
  mask[0, 2:], mask[2, :] = 0, 0
  batch = {"token_mask": jnp.asarray(mask), "mask": jnp.ones((b,), bool)}
  batch["token_weights"] = global_token_weights(batch)
  per_row = common.rescale_query_mean(losses.attention_kl(s, t, where=jnp.asarray(mask) > 0), batch)
  per_query = np.asarray(jnp.mean(jnp.sum(t * (jnp.log(t) - jnp.log(s)), -1), 1))  # [B, L]
  np.testing.assert_allclose(float(jnp.mean(per_row)), (per_query * mask).sum() / mask.sum(), rtol=1e-5)


# --- the train step --------------------------------------------------------------------------------

def lm_batch(seed: int, rows: int, examples_per_row: int) -> dict[str, np.ndarray]:
  """A packed text batch: rows of ``examples_per_row`` examples of random lengths (then padding), each
  example's targets its next tokens, its last token and a random few others not counted."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, GPT["vocab_size"], (rows, L)).astype(np.int32)
  targets = rng.integers(1, GPT["vocab_size"], (rows, L)).astype(np.int32)
  seg, pos = np.zeros((rows, L), np.int32), np.zeros((rows, L), np.int32)
  token_mask = np.zeros((rows, L), np.float32)
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(2, L), examples_per_row, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts]))
    seg[r], pos[r] = pack(list(lengths))
    for start, n in zip(np.concatenate([[0], cuts[:-1]]), lengths):
      token_mask[r, start:start + n - 1] = rng.random(n - 1) < 0.8
  return {"tokens": tokens, "targets": targets, "token_mask": token_mask, "segment_ids": seg, "positions": pos,
          "index": np.arange(rows, dtype=np.int32), "mask": np.ones(rows, bool)}


def unpack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each example of a packed batch in its own row (left-aligned, zero-padded), without segment keys."""
  out = {name: [] for name in ("tokens", "targets", "token_mask")}
  for r in range(len(batch["tokens"])):
    for s in range(1, int(batch["segment_ids"][r].max()) + 1):
      where = batch["segment_ids"][r] == s
      for name in out:
        row = np.zeros(L, batch[name].dtype)
        row[:where.sum()] = batch[name][r][where]
        out[name].append(row)
  n = len(out["tokens"])
  return {**{k: np.stack(v) for k, v in out.items()}, "index": np.arange(n, dtype=np.int32), "mask": np.ones(n, bool)}


SPECS = [dict(loss="ce", weight=1.0), dict(loss="kd", weight=1.0, temperature=2.0)]
OPTIMIZER = dict(name="sgd", learning_rate=0.5, schedule="constant")


def step_results(batch: dict[str, np.ndarray], settings: list[tuple[str, int]], *, shard: bool = False) -> list[dict]:
  """One train step of a tiny gpt student (gpt teacher, ce + token kd) on ``batch`` for each
  ``(token_normalization, microbatches)``: the loss and the updated parameters."""
  student = models.create("gpt", **STEP_GPT, seed=0)
  teacher = models.create("gpt", **STEP_GPT, seed=1)
  task = tasks.LANGUAGE_MODEL
  objective = objective_for(SPECS, student, [teacher], batch, num_examples=64, input_key=task.input_key)
  tx = optim.make(OPTIMIZER, 10, 100)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  graph, params, rest = nnx.split(teacher, nnx.Param, ...)
  variables = [(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))]
  if shard:
    from kdlab import mesh as meshlib
    batch = meshlib.global_batch(batch, meshlib.make_mesh([("data", -1)]))
  out = []
  for normalization, k in settings:
    step = jax.jit(make_train_step(graphdef, objective, tx, [Teacher("t0", graph)], task=task, microbatches=k,
                                   token_normalization=normalization))
    new, metrics = step(state, variables, batch)
    out.append({"loss": reduce_metrics(metrics)["loss"],
                "params": [np.asarray(x).tolist() for x in jax.tree.leaves(new.params)]})
  return out


def assert_same(a: dict, b: dict, what: str) -> None:
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), what
  for x, y in zip(a["params"], b["params"]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7, err_msg=what)


def reference_losses(batch: dict[str, np.ndarray]) -> tuple[float, float]:
  """(global, sequence) ce + kd of the step's models on ``batch``, in numpy from their logits."""
  student = models.create("gpt", **STEP_GPT, seed=0)
  teacher = models.create("gpt", **STEP_GPT, seed=1)
  packed = {k: jnp.asarray(batch[k]) for k in ("segment_ids", "positions") if k in batch}
  s = np.asarray(student(jnp.asarray(batch["tokens"]), train=True, **packed)[0], np.float64)
  t = np.asarray(teacher(jnp.asarray(batch["tokens"]), train=False, **packed)[0], np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  ce = -np.take_along_axis(log_softmax(s), batch["targets"][..., None], -1)[..., 0]
  log_ps, log_pt = log_softmax(s / 2.0), log_softmax(t / 2.0)
  kd = 4.0 * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  m = batch["token_mask"]
  per_token = ce + kd
  counts = m.sum(-1)
  per_sequence = np.where(counts > 0, (per_token * m).sum(-1) / np.maximum(counts, 1), 0.0)
  return float((per_token * m).sum() / m.sum()), float(per_sequence.mean())


def packed_batch() -> dict[str, np.ndarray]:
  """16 packed rows of two examples each, of uneven token counts, one row with none; the 4 strided
  microbatches (rows j, j + 4, ...) count different numbers of tokens."""
  batch = lm_batch(seed=6, rows=16, examples_per_row=2)
  batch["token_mask"][1] = 0.0
  batch["token_mask"][4, :10] = 0.0
  return batch


@functools.cache
def one_device_steps() -> tuple[dict, ...]:
  """``step_results`` of :func:`packed_batch` on this process's one device, for the settings below."""
  return tuple(step_results(packed_batch(), [("global", 1), ("global", 4), ("sequence", 1)]))


def test_packed_loss_equals_the_unpacked_loss_under_global_normalization():
  """The same 32 examples packed two per row (16 rows) or one per row (32 rows): under "global" the
  loss and the update are equal (the teacher sees the packed rows too)."""
  packed = packed_batch()
  unpacked = unpack(packed)
  assert len(unpacked["tokens"]) == 32 and unpacked["token_mask"].sum() == packed["token_mask"].sum()
  [u_global] = step_results(unpacked, [("global", 1)])
  assert_same(one_device_steps()[0], u_global, "packed vs unpacked")


def test_global_normalization_is_the_same_for_1_and_4_microbatches():
  """"global" gives one loss and one update for 1 and 4 microbatches: the per-token mean over the
  whole batch; "sequence" stays the mean of the per-sequence means."""
  batch = packed_batch()
  counts = batch["token_mask"].reshape(-1, 4, L).sum((0, 2))
  assert len(set(counts.tolist())) == 4
  g1, g4, s1 = one_device_steps()
  assert_same(g1, g4, "global, 1 vs 4 microbatches")
  want_global, want_sequence = reference_losses(batch)
  assert g1["loss"] == pytest.approx(want_global, rel=1e-5)
  assert s1["loss"] == pytest.approx(want_sequence, rel=1e-5)
  assert abs(want_global - want_sequence) > 1e-3


# One step on 8 simulated devices (the batch split over them) in 2 microbatches.
SHARDED = """
import json, sys
sys.path.insert(0, "tests")
import jax
import test_packing_model as t
assert jax.device_count() == 8
print(json.dumps(t.step_results(t.packed_batch(), [("global", 2)], shard=True)))
"""


def test_global_normalization_is_the_same_on_1_and_8_devices():
  """The batch split over 8 devices and into 2 microbatches of 8 rows (one per device) gives the
  one-device whole-batch step."""
  proc = run_child([sys.executable, "-c", SHARDED], devices=8)
  [sharded] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert_same(sharded, one_device_steps()[0], "8 devices, 2 microbatches vs 1 device, 1")


def test_bad_token_normalization_is_refused_naming_the_field():
  config = ml_collections.ConfigDict(dict(model=dict(name="gpt"), train=dict(token_normalization="token")))
  with pytest.raises(UserError, match=r"^config\.train\.token_normalization='token': must be 'sequence' or "
                                      r"'global' .*; use e\.g\. --config\.train\.token_normalization=global$"):
    ranges.check(config)
  with pytest.raises(UserError, match="config.train.token_normalization='mean'"):
    make_train_step(None, None, None, [], token_normalization="mean")
