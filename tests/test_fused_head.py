"""Fused output-head losses: several token losses of one head in one chunked pass, the objective
evaluating its ``impl="fused"`` terms together, and a train step with no ``[B, L, V]`` buffer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdlab import cli, losses, models
from kdlab.errors import UserError
from kdlab.losses import fused_head, sequence
from kdlab.train import optim, tasks
from kdlab.train.state import Learner, init_state
from kdlab.train.step import Teacher, make_train_step, objective_for, reduce_metrics

from conftest import HINTON

B, L, DS, DT, V = 3, 10, 8, 12, 40
PARTS = [fused_head.Part("ce", label_smoothing=0.1), fused_head.Part("kd", temperature=2.0),
         fused_head.Part("jsd", temperature=1.5, beta=0.3)]


@pytest.fixture(scope="module")
def head():
  k = jax.random.split(jax.random.key(0), 5)
  mask = np.ones((B, L), np.float32)
  mask[0, 7:], mask[2, :3] = 0, 0
  return dict(s_h=jax.random.normal(k[0], (B, L, DS)), s_w=0.5 * jax.random.normal(k[1], (DS, V)),
              t_h=jax.random.normal(k[2], (B, L, DT)), t_w=0.5 * jax.random.normal(k[3], (DT, V)),
              y=jax.random.randint(k[4], (B, L), 0, V), mask=jnp.asarray(mask))


def plain_parts(d, s_h, s_w, weights=None):
  """``[K, B]``: each part from the full logits, the plain way."""
  s, t = s_h @ s_w, d["t_h"] @ d["t_w"]
  ce = sequence.masked_sequence_mean(losses.ce(s, d["y"], label_smoothing=0.1), d["mask"], weights=weights)
  kd = sequence.token_loss("kd", s, t, d["mask"], temperature=2.0, weights=weights)
  jsd = sequence.token_loss("jsd", s, t, d["mask"], temperature=1.5, beta=0.3, weights=weights)
  return jnp.stack([ce, kd, jsd])


def fused_parts(d, s_h, s_w, coef, weights=None, chunk_size=7):
  """chunk_size 7 over 3 rows: 2 positions a chunk, starts 0, 2, ..., 8 (every chunk whole)."""
  return fused_head.fused_head_losses(s_h, s_w, d["mask"], PARTS, coef=coef, targets=d["y"], t_hidden=d["t_h"],
                                      t_unembed=d["t_w"], weights=weights, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [7, 9, None])  # 2 positions a chunk; 3 (the last chunk overlaps); all
def test_parts_values_predictions_and_gradients_equal_the_plain_losses(head, chunk_size):
  d = head
  coef = jnp.asarray([0.5, 0.3, 0.2])
  out = fused_parts(d, d["s_h"], d["s_w"], coef, chunk_size=chunk_size)
  want = plain_parts(d, d["s_h"], d["s_w"])
  np.testing.assert_allclose(out.per_part, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.combined, coef @ want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out.predictions, jnp.argmax(d["s_h"] @ d["s_w"], -1))
  g = jnp.asarray([0.7, -1.3, 2.0])  # a non-uniform cotangent: dW is recomputed chunk by chunk
  for cot in (jnp.ones((B,)) / B, g):
    fused = jax.grad(lambda h, w, c: cot @ fused_parts(d, h, w, c, chunk_size=chunk_size).combined, (0, 1, 2))
    plain = jax.grad(lambda h, w, c: cot @ (c @ plain_parts(d, h, w)), (0, 1, 2))
    for a, b in zip(fused(d["s_h"], d["s_w"], coef), plain(d["s_h"], d["s_w"], coef)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_token_weights_replace_the_per_sequence_mean(head):
  d = head
  weights = d["mask"] * 0.37
  coef = jnp.asarray([1.0, 2.0, 0.5])
  out = fused_parts(d, d["s_h"], d["s_w"], coef, weights=weights)
  np.testing.assert_allclose(out.per_part, plain_parts(d, d["s_h"], d["s_w"], weights), rtol=1e-5, atol=1e-7)
  fused = jax.grad(lambda w: fused_parts(d, d["s_h"], w, coef, weights=weights).combined.sum())(d["s_w"])
  plain = jax.grad(lambda w: (coef @ plain_parts(d, d["s_h"], w, weights)).sum())(d["s_w"])
  np.testing.assert_allclose(fused, plain, rtol=2e-5, atol=1e-6)


def test_ce_alone_needs_no_teacher_and_the_per_part_values_carry_no_gradient(head):
  d = head
  out = fused_head.fused_head_losses(d["s_h"], d["s_w"], d["mask"], [fused_head.Part("ce")], targets=d["y"])
  want = sequence.masked_sequence_mean(losses.ce(d["s_h"] @ d["s_w"], d["y"]), d["mask"])
  np.testing.assert_allclose(out.combined, want, rtol=1e-5)
  grad = jax.grad(lambda w: fused_head.fused_head_losses(d["s_h"], w, d["mask"], [fused_head.Part("ce")],
                                                         targets=d["y"]).per_part.sum())(d["s_w"])
  assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("kwargs, message", [
    (dict(parts=[fused_head.Part("ce")]), "targets: a 'ce' part needs the [batch, length] target tokens"),
    (dict(parts=[fused_head.Part("kd")]), "t_hidden, t_unembed: a divergence part needs the teacher's"),
    (dict(parts=[fused_head.Part("kl")]), "divergence: unknown 'kl'"),
    (dict(parts=[fused_head.Part("ce", label_smoothing=1.0)], targets=True), "label_smoothing must be in [0, 1)"),
    (dict(parts=[fused_head.Part("ce")], targets=True, coef=[1.0, 2.0]), "coef: expected shape (1,)"),
    (dict(parts=[]), "parts: give at least one Part"),
])
def test_bad_arguments_name_the_argument(head, kwargs, message):
  d = head
  kwargs = dict(kwargs)
  if kwargs.pop("targets", None):
    kwargs["targets"] = d["y"]
  with pytest.raises(ValueError, match=re.escape(message)):
    fused_head.fused_head_losses(d["s_h"], d["s_w"], d["mask"], **kwargs)


# --- the objective and the train step ---------------------------------------------------------------

SEQ, VOCAB = 16, 97
GPT = dict(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, max_len=SEQ)


def _batch(rows: int = 4) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  token_mask = (rng.random((rows, SEQ)) < 0.8).astype(np.float32)
  return {"tokens": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32),
          "targets": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32), "token_mask": token_mask,
          "index": np.arange(rows, dtype=np.int32), "mask": np.ones(rows, bool)}


def _specs(impl: str, chunk_size: int | None = 12) -> list[dict]:
  extra = {} if impl == "plain" else dict(impl=impl, chunk_size=chunk_size)
  return [dict(loss="ce", weight=0.4, **extra),
          dict(loss="kd", weight=dict(schedule="linear", init=0.6, end=0.2, steps=4), temperature=2.0, **extra)]


def _step(impl: str, batch: dict, term_grad_norms: bool = False):
  student, teacher = models.create("gpt", **GPT, seed=0), models.create("gpt", **GPT, seed=1)
  task = tasks.LANGUAGE_MODEL
  objective = objective_for(_specs(impl), student, [teacher], batch, num_examples=8, input_key=task.input_key)
  tx = optim.make(dict(name="sgd", learning_rate=0.5, schedule="constant"), 10, 100)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  graph, params, rest = nnx.split(teacher, nnx.Param, ...)
  variables = [(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))]
  step = jax.jit(make_train_step(graphdef, objective, tx, [Teacher("t0", graph)], task=task,
                                 term_grad_norms=term_grad_norms))
  return step, state, variables


def test_a_fused_ce_and_kd_step_equals_the_plain_step():
  """Loss, per-term metrics, train accuracy and the updated parameters (two steps, a scheduled weight)."""
  batch = _batch()
  results = {}
  for impl in ("plain", "fused"):
    step, state, variables = _step(impl, batch)
    history = []
    for _ in range(2):
      state, metrics = step(state, variables, batch)
      history.append(reduce_metrics(metrics))
    results[impl] = history, jax.tree.leaves(state.params)
  (plain, p_params), (fused, f_params) = results["plain"], results["fused"]
  for a, b in zip(plain, fused):
    for key in ("loss", "task/ce", "distill/kd", "train/accuracy", "weight/kd"):
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key  # kd is small: 7e-3
  assert plain[1]["weight/kd"] == pytest.approx(0.5)
  for a, b in zip(p_params, f_params):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_term_gradient_norms_evaluate_the_fused_terms_one_by_one():
  batch = _batch()
  norms = {}
  for impl in ("plain", "fused"):
    step, state, variables = _step(impl, batch, term_grad_norms=True)
    metrics = reduce_metrics(step(state, variables, batch)[1])
    norms[impl] = [metrics["grad_norm/ce"], metrics["grad_norm/kd"], metrics["loss"]]
  np.testing.assert_allclose(norms["fused"], norms["plain"], rtol=1e-5)


def _vocab_buffers(hlo: str, rows: int) -> list[str]:
  """Shapes in ``hlo`` holding a whole batch's logits: ``[rows, SEQ, VOCAB]`` or ``[rows * SEQ, VOCAB]``."""
  pattern = rf"\[(?:{rows},{SEQ},{VOCAB}|{rows * SEQ},{VOCAB}|{VOCAB},{rows * SEQ})\]"
  return sorted(set(re.findall(pattern, hlo)))


def test_the_compiled_fused_step_holds_no_batch_of_logits():
  """The thing itself: the optimized HLO of the plain step has [B, L, V] buffers, the fused one has
  none (the teacher's logits, the student's, their softmax and gradient are all chunk-sized)."""
  batch = _batch()
  found = {}
  for impl in ("plain", "fused"):
    step, state, variables = _step(impl, batch)
    found[impl] = _vocab_buffers(step.lower(state, variables, batch).compile().as_text(), 4)
  assert found["plain"], "the pattern no longer finds the plain step's logits"
  assert found["fused"] == []


def test_fused_terms_of_one_head_refuse_two_chunk_sizes():
  batch = _batch()
  student, teacher = models.create("gpt", **GPT, seed=0), models.create("gpt", **GPT, seed=1)
  specs = _specs("fused")
  specs[1]["chunk_size"] = 20
  with pytest.raises(UserError, match=re.escape("config.objective[1] (kd): chunk_size=20 but config.objective[0] "
                                                "(ce) has chunk_size=12; the fused terms of one head share its "
                                                "chunks: give them one chunk_size")):
    objective_for(specs, student, [teacher], batch, num_examples=8, input_key="tokens")


def test_fused_ce_on_an_image_model_is_a_one_line_error(tmp_path, capsys):
  workdir = tmp_path / "run"
  code = cli.main(["train", f"--config={HINTON}:student,source=digits,quick", f"--workdir={workdir}",
                   "--nowandb", "--no-progress", "--config.objective=[{'loss': 'ce', 'impl': 'fused'}]"])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert "config.objective[0] (ce): impl='fused' applies to token logits [batch, length, vocab]" in err
  assert not workdir.exists()
