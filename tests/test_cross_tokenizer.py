"""Cross-tokenizer distillation: ULD and chunk likelihood matching, the alignment, the terms, training."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdlab.data import alignment
from kdlab.data.hf_tokenizer import HFTokenizer
from kdlab.errors import UserError
from kdlab.losses import cross_tokenizer as xtok
from kdlab.models import create
from kdlab.objective import ModelOutput, Shapes, StepInputs, build

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "xtok"

# Prompt/completion pairs; each prompt ends where both tokenizers have a boundary (a newline).
EXAMPLES = [
    ("# reverse a list\n", "def reverse(items):\n    return items[::-1]\n"),
    ("Q: the length?\n", "len(text) counts characters: 'été' has 3.\n"),
    ("# sum of squares\n", "total = sum(x * x for x in range(10))  # 285\n"),
    ("Translate:\n", "Grüße aus Zürich — 日本語 ✓ done\n"),
]


@pytest.fixture(scope="module")
def small():
  return HFTokenizer.from_dir(FIXTURES / "small")


@pytest.fixture(scope="module")
def large():
  return HFTokenizer.from_dir(FIXTURES / "large")


# --- ULD -----------------------------------------------------------------------------------------

def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_uld(s, t, s_mask, t_mask, temperature):
  """The sorted-vector L1 written out: pair the i-th counted positions, pad, sort, sum |diff|."""
  out = []
  for b in range(s.shape[0]):
    s_pos, t_pos = np.flatnonzero(s_mask[b]), np.flatnonzero(t_mask[b])
    k = min(len(s_pos), len(t_pos))
    width = max(s.shape[-1], t.shape[-1])
    dists = []
    for i in range(k):
      ps = np.zeros(width)
      pt = np.zeros(width)
      ps[:s.shape[-1]] = np.sort(_np_softmax(s[b, s_pos[i]] / temperature))[::-1]
      pt[:t.shape[-1]] = np.sort(_np_softmax(t[b, t_pos[i]] / temperature))[::-1]
      dists.append(np.abs(ps - pt).sum())
    out.append(np.mean(dists) if dists else 0.0)
  return np.asarray(out)


@pytest.fixture(scope="module")
def uld_data():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 7, 11)) * 2
  t = rng.normal(size=(3, 9, 17)) * 2
  s_mask = np.ones((3, 7), np.float32)
  t_mask = np.ones((3, 9), np.float32)
  s_mask[0, :2] = 0      # a prompt; the student has fewer counted tokens than the teacher
  t_mask[1, [0, 4, 8]] = 0  # holes; the teacher has fewer
  s_mask[2] = 0          # no counted tokens: loss 0
  return s, t, s_mask, t_mask


def test_uld_equals_the_sorted_vector_l1(uld_data):
  s, t, s_mask, t_mask = uld_data
  got = xtok.uld(jnp.float32(s), jnp.float32(t), s_mask, t_mask, temperature=2.0)
  np.testing.assert_allclose(got, _np_uld(s, t, s_mask, t_mask, 2.0), rtol=1e-5, atol=1e-6)
  assert got[2] == 0.0 and got[0] > 0.1


def test_uld_weights_replace_the_mean(uld_data):
  s, t, s_mask, t_mask = uld_data
  w = np.random.default_rng(1).uniform(size=s_mask.shape).astype(np.float32)
  got = xtok.uld(jnp.float32(s), jnp.float32(t), s_mask, t_mask, weights=w)
  # Row 1: 7 student positions, 6 teacher ones: the student's 7th position has no pair (value 0).
  per_pair = [_np_uld(s[1:2, [l]], t[1:2, [m]], np.ones((1, 1)), np.ones((1, 1)), 1.0)[0]
              for l, m in zip(range(6), np.flatnonzero(t_mask[1]))]
  np.testing.assert_allclose(got[1], np.dot(w[1, :6], per_pair), rtol=1e-5)


def test_uld_is_zero_with_zero_gradient_for_an_equal_student(uld_data):
  _, t, _, t_mask = uld_data
  t = jnp.float32(t)
  loss, grad = jax.value_and_grad(lambda s: jnp.sum(xtok.uld(s, t, t_mask, t_mask, temperature=2.0)))(t)
  assert abs(float(loss)) < 1e-6
  assert float(jnp.max(jnp.abs(grad))) < 1e-6
  moved = jax.grad(lambda s: jnp.sum(xtok.uld(s, t, t_mask, t_mask)))(t + 0.1 * jnp.arange(17.0))
  assert float(jnp.max(jnp.abs(moved))) > 1e-3  # the check above can fail


# --- chunk likelihood matching -------------------------------------------------------------------

def _np_aligned(s, s_y, s_c, t, t_y, t_c, temperature):
  def chunk_lp(logits, y, c):
    lp = np.log(_np_softmax(logits / temperature))
    sums, counts = {}, {}
    for l, cid in enumerate(c):
      if cid >= 0:
        sums[cid] = sums.get(cid, 0.0) + lp[l, y[l]]
        counts[cid] = counts.get(cid, 0) + 1
    return sums, counts

  out = []
  for b in range(s.shape[0]):
    s_lp, s_n = chunk_lp(s[b], s_y[b], s_c[b])
    t_lp, _ = chunk_lp(t[b], t_y[b], t_c[b])
    common = sorted(set(s_lp) & set(t_lp))
    total = 0.0
    for c in common:
      a, q = min(t_lp[c], -1e-6), min(s_lp[c], -1e-6)
      p_, q_ = np.exp(a), np.exp(q)
      total += p_ * (a - q) + (1 - p_) * (np.log(1 - p_) - np.log(1 - q_))
    n = sum(s_n[c] for c in common)
    out.append(total / n if n else 0.0)
  return np.asarray(out)


def test_aligned_kd_equals_the_chunk_binary_kl():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 8, 6)), rng.normal(size=(2, 6, 9))
  s_y, t_y = rng.integers(0, 6, (2, 8)), rng.integers(0, 9, (2, 6))
  # Chunk 2 of row 0 exists on the student side only: it does not count.
  s_c = np.array([[-1, 0, 0, 1, 2, 3, 3, 3], [0, 1, 1, 2, 3, 4, -1, -1]])
  t_c = np.array([[-1, 0, 1, 3, 3, -1], [0, 1, 2, 3, 4, 4]])
  got = xtok.aligned_kd(jnp.float32(s), s_y, s_c, jnp.float32(t), t_y, t_c, temperature=1.5)
  np.testing.assert_allclose(got, _np_aligned(s, s_y, s_c, t, t_y, t_c, 1.5), rtol=1e-5)
  assert np.all(np.asarray(got) > 0)


def test_binary_kl_is_finite_for_a_sure_student():
  log_p = jnp.log(jnp.float32([0.3, 0.9, 1e-20]))
  val, grad = jax.value_and_grad(lambda q: jnp.sum(xtok.binary_kl(log_p, q)))(jnp.zeros(3))
  assert np.all(np.isfinite(val)) and np.all(np.asarray(grad) > 0)  # pushed below certainty


# --- the alignment ---------------------------------------------------------------------------------

def _chunk_texts(text, offsets, chunks):
  out = {}
  for (a, b), c in zip(offsets, chunks):
    if c >= 0:
      lo, hi = out.get(int(c), (a, b))
      out[int(c)] = (min(lo, a), max(hi, b))
  return {c: text[a:b] for c, (a, b) in out.items()}


# The fixture pair, and tests/test_hf_tokenizer.py's ChatML tokenizer with its GPT-2-style one (a BOS, a prefix
# space token overlapping the first word).
PAIRS = {"xtok": (FIXTURES / "small", FIXTURES / "large"),
         "hf": (FIXTURES.parent / "hf_tokenizer" / "chatml", FIXTURES.parent / "hf_tokenizer" / "other")}


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("prompt, completion", EXAMPLES)
def test_chunks_hold_the_same_text_on_both_sides_and_cover_the_completion(pair, prompt, completion):
  student, teacher = (HFTokenizer.from_dir(path) for path in PAIRS[pair])
  text = prompt + completion
  span = [(len(prompt), len(text))]
  _, s_off = alignment.encode(student, text)
  _, t_off = alignment.encode(teacher, text)
  s_c, t_c = alignment.chunk_ids(s_off, span, t_off, span)
  s_text, t_text = _chunk_texts(text, s_off, s_c), _chunk_texts(text, t_off, t_c)
  assert s_text == t_text
  assert "".join(s_text[c] for c in range(len(s_text))) == completion
  # The two tokenizations differ, so some chunks join several tokens of one side.
  assert len(s_text) < max(np.sum(s_c >= 0), np.sum(t_c >= 0))


def test_chunk_ids_of_split_characters_gaps_and_two_spans():
  # Content "ab€" + "cd": in the student's text at 2..5 and 5..7; in the teacher's at 0..3 and 10..12.
  s_off = np.array([[0, 2], [2, 3], [3, 4], [4, 5], [4, 5], [5, 7]])   # "..", a, b, €(2 bytes), cd
  t_off = np.array([[0, 2], [2, 3], [10, 11], [11, 12]])               # ab, €, c, d
  s_c, t_c = alignment.chunk_ids(s_off, [(2, 5), (5, 7)], t_off, [(0, 3), (10, 12)])
  np.testing.assert_array_equal(s_c, [-1, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(t_c, [0, 1, 2, 2])
  # A teacher token reaching over the content's start: "ab" is not covered there, its chunk goes.
  s_c, t_c = alignment.chunk_ids(s_off, [(2, 7)], np.array([[0, 3], [3, 4], [4, 6]]), [(1, 6)])
  np.testing.assert_array_equal(s_c, [-1, -1, -1, 0, 0, 1])
  np.testing.assert_array_equal(t_c, [-1, 0, 1])
  with pytest.raises(ValueError, match="same text"):
    alignment.chunk_ids(s_off, [(2, 5), (5, 7)], t_off, [(0, 3)])


def test_align_arrays_follow_the_targets(small, large):
  prompt, completion = EXAMPLES[0]
  out = alignment.align_completion(prompt, completion, small, large, student_len=64, teacher_len=40)
  assert out["tokens"].shape == out["student_chunks"].shape == (64,)
  assert out["teacher_tokens"].shape == out["teacher_chunks"].shape == (40,)
  for y, c, m, tok in ((out["targets"], out["student_chunks"], out["token_mask"], small),
                       (out["teacher_targets"], out["teacher_chunks"], out["teacher_token_mask"], large)):
    texts = [tok.decode(y[c == k]) for k in range(c.max() + 1)]
    assert "".join(texts) == completion
    assert np.all(m[c >= 0] == 1)  # chunked targets are completion targets
    assert tok.decode(y[m > 0]) == completion
  # A short student window: the chunks it cannot hold are dropped on both sides.
  short = alignment.align_completion(prompt, completion, small, large, student_len=20, teacher_len=40)
  n = short["student_chunks"].max() + 1
  assert 0 < n < out["student_chunks"].max() + 1 and short["teacher_chunks"].max() + 1 == n
  assert completion.startswith(large.decode(short["teacher_targets"][short["teacher_chunks"] >= 0]))
  with pytest.raises(ValueError, match="same characters"):
    alignment.align("ab", [(0, 1)], small, "ab", [(1, 2)], large, student_len=4, teacher_len=4)


def test_same_tokenizer_gives_one_chunk_per_character_group(small):
  prompt, completion = EXAMPLES[3]
  out = alignment.align_completion(prompt, completion, small, small, student_len=80, teacher_len=80)
  np.testing.assert_array_equal(out["student_chunks"], out["teacher_chunks"])
  np.testing.assert_array_equal(out["targets"], out["teacher_targets"])


# --- zero at the teacher, for both losses, on aligned data -----------------------------------------

def test_both_losses_vanish_with_their_gradients_for_the_teacher_itself(small):
  batch = _batch(small, small, 80, 80)
  logits = jax.random.normal(jax.random.key(0), (len(EXAMPLES), 80, small.vocab_size)) * 3

  @jax.jit
  def values_and_grads(s, t):
    def total(s):
      a = xtok.aligned_kd(s, batch["targets"], batch["student_chunks"], t, batch["teacher_targets"],
                          batch["teacher_chunks"], temperature=2.0)
      u = xtok.uld(s, t, batch["token_mask"], batch["teacher_token_mask"], temperature=2.0)
      return jnp.stack([jnp.sum(a), jnp.sum(u)])
    return total(s), jax.jacrev(total)(s)

  values, grads = values_and_grads(logits, logits)
  assert float(jnp.max(jnp.abs(values))) < 1e-6 and float(jnp.max(jnp.abs(grads))) < 1e-6
  _, moved = values_and_grads(logits * 0.5, logits)
  assert float(jnp.min(jnp.max(jnp.abs(moved), axis=(1, 2, 3)))) > 1e-4  # both losses: the check can fail


# --- the terms -------------------------------------------------------------------------------------

def _batch(student, teacher, ls, lt):
  rows = [alignment.align_completion(p, c, student, teacher, student_len=ls, teacher_len=lt) for p, c in EXAMPLES]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  return batch | {"mask": jnp.ones(len(rows), bool), "index": jnp.arange(len(rows), dtype=jnp.int32)}


def _shapes(batch, vs, vt, lt=None):
  b, ls = batch["tokens"].shape
  lt = batch["teacher_tokens"].shape[1] if lt is None else lt
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  return Shapes(student=ModelOutput(jax.ShapeDtypeStruct((b, ls, vs), jnp.float32), {}),
                teachers=[ModelOutput(jax.ShapeDtypeStruct((b, lt, vt), jnp.float32), {})],
                teacher_names=["t"], num_examples=8, batch=spec)


def test_terms_are_the_losses_and_refuse_missing_data(small, large):
  batch = _batch(small, large, 64, 48)
  k1, k2 = jax.random.split(jax.random.key(1))
  s = jax.random.normal(k1, (len(EXAMPLES), 64, small.vocab_size))
  t = jax.random.normal(k2, (len(EXAMPLES), 48, large.vocab_size))
  shapes = _shapes(batch, small.vocab_size, large.vocab_size)
  objective = build([dict(loss="uld", weight=1.0, temperature=2.0), dict(loss="aligned_kd", weight=0.5)],
                    shapes, nnx.Rngs(0))

  @jax.jit
  def run(s, t, batch):
    inputs = StepInputs(student=ModelOutput(s, {}), teachers=[ModelOutput(t, {})], batch=batch,
                        step=jnp.int32(0), key=jax.random.key(0))
    return objective({}, inputs, {})[:2]

  total, metrics = run(s, t, batch)
  uld = xtok.uld(s, t, batch["token_mask"], batch["teacher_token_mask"], temperature=2.0)
  aligned = xtok.aligned_kd(s, batch["targets"], batch["student_chunks"], t, batch["teacher_targets"],
                            batch["teacher_chunks"])
  np.testing.assert_allclose(metrics["distill/uld"][0], jnp.sum(uld), rtol=1e-6)
  np.testing.assert_allclose(metrics["distill/aligned_kd"][0], jnp.sum(aligned), rtol=1e-6)
  np.testing.assert_allclose(total, jnp.mean(uld) + 0.5 * jnp.mean(aligned), rtol=1e-6)
  # Global token weights replace the per-sequence means.
  w = batch["token_mask"] * len(EXAMPLES) / jnp.sum(batch["token_mask"])
  _, weighted = run(s, t, batch | {"token_weights": w})
  want = xtok.uld(s, t, batch["token_mask"], batch["teacher_token_mask"], temperature=2.0, weights=w)
  np.testing.assert_allclose(weighted["distill/uld"][0], jnp.sum(want), rtol=1e-6)

  plain = {k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "student_chunks"}
  with pytest.raises(UserError, match=r"aligned_kd.*reads batch keys \['student_chunks', 'teacher_tokens'"):
    build([dict(loss="aligned_kd")], _shapes(plain, small.vocab_size, large.vocab_size, lt=48), nnx.Rngs(0))
  with pytest.raises(UserError, match="the teacher must run on batch\\['teacher_tokens'\\]"):
    build([dict(loss="uld")], _shapes(batch, small.vocab_size, large.vocab_size, lt=64), nnx.Rngs(0))
  with pytest.raises(UserError, match="from_teacher='self'"):
    build([dict(loss="uld", from_teacher="self")], shapes, nnx.Rngs(0))
  with pytest.raises(UserError, match="unknown option"):
    build([dict(loss="aligned_kd", beta=0.5)], shapes, nnx.Rngs(0))


# --- training a student with another vocabulary ------------------------------------------------------

def _llama(vocab, seed, init=0.02):
  return create("llama", seed=seed, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=128, initializer_range=init)


@pytest.mark.parametrize("loss", ["aligned_kd", "uld"])
def test_a_student_with_another_vocab_learns_from_the_teacher(small, large, loss):
  batch = _batch(small, large, 64, 48)
  teacher = _llama(large.vocab_size, seed=1, init=0.5)  # fixed, with peaked distributions
  t_logits = nnx.jit(lambda m, x: m(x, train=False)[0])(teacher, batch["teacher_tokens"])
  graphdef, params, rest = nnx.split(_llama(small.vocab_size, seed=2), nnx.Param, ...)

  def objective(params, t_logits):
    s_logits = nnx.merge(graphdef, params, rest)(batch["tokens"], train=False)[0]
    if loss == "uld":
      per_seq = xtok.uld(s_logits, t_logits, batch["token_mask"], batch["teacher_token_mask"])
    else:
      per_seq = xtok.aligned_kd(s_logits, batch["targets"], batch["student_chunks"], t_logits,
                                batch["teacher_targets"], batch["teacher_chunks"])
    return jnp.mean(per_seq)

  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, t_logits):  # the teacher's logits an argument: no constant folding of them
    value, grads = jax.value_and_grad(objective)(params, t_logits)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state, history = opt.init(params), []
  for _ in range(30):
    params, opt_state, value = step(params, opt_state, t_logits)
    history.append(float(value))
  assert np.all(np.isfinite(history))
  assert np.mean(history[-3:]) < 0.7 * history[0], history
