"""Gradient accumulation (``make_train_step(..., microbatches=k)``, ``config.train.microbatches``).

One step on a batch of ``4N`` split into 4 microbatches equals one step on the whole batch (metrics
and parameters within 1e-6) and differs from a step on ``N`` of its examples: for an image MLP
(digits, ce + kd) and for a tiny GPT on pysrc through the language-model task (ce + token kd,
with sequences of different token counts). Term states (CRD's memory bank) and the learner's other
variables (dropout streams) are carried from microbatch to microbatch; bad settings fail at
start-up naming ``config.train.microbatches``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdlab import models
from kdlab.data import load as load_source
from kdlab.data.pipeline import Normalize, gather
from kdlab.errors import UserError
from kdlab.train import optim, tasks
from kdlab.train.state import Learner, init_state
from kdlab.train.step import (Teacher, check_microbatches, make_train_step, objective_for, reduce_metrics,
                              split_microbatches)

from conftest import run_child

N, K = 8, 4  # microbatch size, microbatches
OPTIMIZER = dict(name="sgd", learning_rate=0.5, momentum=0.9, weight_decay=5e-4, schedule="constant")


def _teacher_vars(teacher: nnx.Module):
  graph, params, rest = nnx.split(teacher, nnx.Param, ...)
  return Teacher("t0", graph), (nnx.to_pure_dict(params), nnx.to_pure_dict(rest))


def _steps(student, teacher, batch, specs, task, *, num_examples, microbatch_counts, **step_options):
  """For each ``k`` in ``microbatch_counts``: ``(metrics, params, state)`` after one step on ``batch``
  (``k = 0``: one plain step on the first ``N`` examples only)."""
  objective = objective_for(specs, student, [teacher], batch, num_examples=num_examples,
                            input_key=task.input_key)
  tx = optim.make(OPTIMIZER, 10, 100)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  graph, variables = _teacher_vars(teacher)
  out = []
  for k in microbatch_counts:
    step = jax.jit(make_train_step(graphdef, objective, tx, [graph], task=task, microbatches=max(k, 1),
                                   lr_schedule=optim.learning_rate(OPTIMIZER, 10, 100), **step_options))
    b = batch if k else {name: x[:N] for name, x in batch.items()}
    new_state, metrics = step(state, [variables], b)
    out.append((reduce_metrics(metrics), new_state.params, new_state))
  return state, out


def _assert_same_step(whole, accumulated, partial):
  (m1, p1, _), (mk, pk, _), (mn, pn, _) = whole, accumulated, partial
  assert set(m1) == set(mk) and {"loss", "task/ce", "distill/kd", "l2_grads", "lr", "train/accuracy"} <= set(m1)
  for name in m1:
    np.testing.assert_allclose(mk[name], m1[name], rtol=1e-6, atol=1e-7, err_msg=name)
  flat1, flatk, flatn = (jax.tree.leaves(p) for p in (p1, pk, pn))
  for a, b in zip(flat1, flatk):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  # A step on N of the examples moves the parameters elsewhere (the comparison can fail).
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat1, flatn)) > 1e-3
  assert abs(mn["loss"] - m1["loss"]) > 1e-4


def test_microbatches_of_an_mlp_step_equal_the_whole_batch_step():
  source = load_source("digits", "train")
  batch = Normalize()(gather(source, np.arange(K * N)))
  student = models.create("mlp", in_features=64, hidden=(32,), num_classes=10, seed=0)
  teacher = models.create("mlp", in_features=64, hidden=(48,), num_classes=10, seed=1)
  specs = [dict(loss="ce", weight=1.0), dict(loss="kd", weight=0.5, temperature=4.0)]
  _, (whole, accumulated, partial) = _steps(student, teacher, batch, specs, tasks.CLASSIFICATION,
                                            num_examples=len(source), microbatch_counts=(1, K, 0))
  _assert_same_step(whole, accumulated, partial)
  assert whole[0]["lr"] == pytest.approx(0.5)


def test_microbatches_of_a_gpt_step_equal_the_whole_batch_step_whatever_the_token_counts():
  """Each sequence's loss is the mean over its own real tokens, so microbatches holding different
  numbers of real tokens still average to the whole batch's loss (only the number of examples with
  ``mask`` must agree)."""
  data = ml_collections.ConfigDict(dict(source="pysrc", seq_len=16, max_bytes=2048, eval_max_bytes=256,
                                        batch_size=K * N))
  task = tasks.LANGUAGE_MODEL
  train_source, _ = task.load(data)
  batch = dict(task.train_dataset(train_source, data, seed=0)[0])
  token_mask = batch["token_mask"].copy()
  token_mask[0, 5:] = 0.0  # Microbatch 0 (rows 0, 4, ...) gets 11 fewer real tokens, microbatch 1 none.
  token_mask[K + 2, :] = 0.0  # A sequence with no real token in microbatch 2.
  batch["token_mask"] = token_mask
  gpt = dict(vocab_size=256, num_layers=1, num_heads=2, max_len=16)
  student = models.create("gpt", d_model=16, **gpt, seed=0)
  teacher = models.create("gpt", d_model=16, **gpt, seed=1)
  specs = [dict(loss="ce", weight=1.0), dict(loss="kd", weight=1.0, temperature=2.0)]
  _, (whole, accumulated, partial) = _steps(student, teacher, batch, specs, task, num_examples=len(train_source),
                                            microbatch_counts=(1, K, 0))
  _assert_same_step(whole, accumulated, partial)


def test_term_states_and_dropout_streams_are_carried_through_the_microbatches():
  """CRD's memory bank takes every microbatch's rows; the student's dropout stream advances once per
  microbatch (as K separate steps would advance it)."""
  source = load_source("digits", "train")
  batch = Normalize()(gather(source, np.arange(K * N)))
  student = models.create("mlp", in_features=64, hidden=(32,), num_classes=10, dropout=0.1, seed=0)
  teacher = models.create("mlp", in_features=64, hidden=(48,), num_classes=10, seed=1)
  specs = [dict(loss="ce"), dict(loss="crd", weight=0.1, feat_dim=8, num_negatives=16)]
  state, [(metrics, _, new)] = _steps(student, teacher, batch, specs, tasks.CLASSIFICATION,
                                      num_examples=len(source), microbatch_counts=(K,))
  before, after = state.term_states["crd"], new.term_states["crd"]
  changed = [np.flatnonzero(np.any(np.asarray(a) != np.asarray(b), axis=tuple(range(1, np.ndim(a)))))
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)) if np.ndim(a) == 2]
  assert changed and all(list(rows) == list(range(K * N)) for rows in changed)
  count = lambda s: int(s.rest["student"]["dropout"]["rngs"]["count"])  # noqa: E731
  assert count(new) - count(state) == K
  assert np.isfinite(metrics["loss"])


def test_term_grad_norms_average_the_microbatches_and_connector_warmup_freezes_the_student():
  """``grad_norm/<term>`` with microbatches is the mean of each microbatch's norm; during the
  connector warm-up the accumulated step moves the connectors only."""
  source = load_source("digits", "train")
  batch = Normalize()(gather(source, np.arange(K * N)))
  student = models.create("mlp", in_features=64, hidden=(32,), num_classes=10, seed=0)
  teacher = models.create("mlp", in_features=64, hidden=(48,), num_classes=10, seed=1)
  specs = [dict(loss="ce"), dict(loss="fitnet", student="hidden1", teacher="hidden1")]
  objective = objective_for(specs, student, [teacher], batch, num_examples=len(source))
  tx = optim.make(OPTIMIZER, 10, 100)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  graph, variables = _teacher_vars(teacher)

  def step(k):
    return jax.jit(make_train_step(graphdef, objective, tx, [graph], term_grad_norms=True,
                                   connector_warmup_steps=1, microbatches=k))

  new, metrics = step(K)(state, [variables], batch)
  one = step(1)
  micro = split_microbatches(batch, K)
  per_micro = [one(state, [variables], {name: x[j] for name, x in micro.items()})[1] for j in range(K)]
  for term in ("ce", "fitnet"):
    mean = np.mean([float(m[f"grad_norm/{term}"][0]) for m in per_micro])
    assert float(metrics[f"grad_norm/{term}"][0] / metrics[f"grad_norm/{term}"][1]) == pytest.approx(mean, rel=1e-5)
  for a, b in zip(jax.tree.leaves(state.params["student"]), jax.tree.leaves(new.params["student"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params["connectors"]),
                                                           jax.tree.leaves(new.params["connectors"]))]
  assert moved and max(moved) > 1e-4


# Run on 8 simulated devices: the batch split over them, one step with and without microbatches.
SHARDED_STEP = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from kdlab import mesh as meshlib, models
from kdlab.data import load
from kdlab.data.pipeline import Normalize, gather
from kdlab.train import optim
from kdlab.train.state import Learner, init_state
from kdlab.train.step import Teacher, make_train_step, objective_for
source = load("digits", "train")
batch = Normalize()(gather(source, np.arange(64)))
student = models.create("mlp", in_features=64, hidden=(32,), num_classes=10, seed=0)
teacher = models.create("mlp", in_features=64, hidden=(48,), num_classes=10, seed=1)
objective = objective_for([dict(loss="ce"), dict(loss="kd", temperature=4.0)], student, [teacher], batch,
                          num_examples=len(source))
tx = optim.make(dict(name="sgd", learning_rate=0.5, schedule="constant"), 10, 100)
graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
graph, params, rest = nnx.split(teacher, nnx.Param, ...)
variables = [(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))]
batch = meshlib.global_batch(batch, meshlib.make_mesh([("data", -1)]))
out = {}
for k in (1, 4):
  step = jax.jit(make_train_step(graphdef, objective, tx, [Teacher("t0", graph)], microbatches=k))
  hlo = step.lower(state, variables, batch).compile().as_text()
  new, _ = step(state, variables, batch)
  out[k] = dict(params=[np.asarray(x).tolist() for x in jax.tree.leaves(new.params)],
                gathers=hlo.count("all-gather") + hlo.count("all-to-all"))
print(json.dumps(out))
"""


def test_sharded_batch_microbatches_stay_split_over_the_devices():
  """Each microbatch is split over all 8 devices (strided microbatches: no gathering of the batch),
  and the accumulated step equals the whole-batch step there too."""
  proc = run_child([sys.executable, "-c", SHARDED_STEP], devices=8)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["4"]["gathers"] == 0 and out["1"]["gathers"] == 0
  for a, b in zip(out["1"]["params"], out["4"]["params"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_split_microbatches_is_strided_and_keeps_every_row():
  batch = {"x": np.arange(12).reshape(6, 2), "y": np.arange(6)}
  split = split_microbatches(batch, 3)
  assert split["x"].shape == (3, 2, 2)
  assert split["y"].tolist() == [[0, 3], [1, 4], [2, 5]]
  assert sorted(np.asarray(split["x"]).reshape(-1).tolist()) == list(range(12))


@pytest.mark.parametrize("batch_size, k, devices, message", [
    (40, 3, 1, "config.train.microbatches=3: config.data.batch_size=40 does not split into 3 equal microbatches; "
               "use microbatches dividing 40"),
    (40, 4, 8, "into 4 equal microbatches each split evenly over the 8 data-parallel devices; use microbatches "
               "dividing 5 or a batch_size that is a multiple of 32"),
    (40, 0, 1, "config.train.microbatches=0: use a whole number >= 1"),
    (40, 2.0, 1, "config.train.microbatches=2.0: use a whole number >= 1"),
])
def test_bad_microbatches_fail_naming_the_field(batch_size, k, devices, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
    check_microbatches(batch_size, k, devices)


def test_check_microbatches_accepts_even_splits():
  assert check_microbatches(64, 4, 8) == 4
  assert check_microbatches(40, 1, 1) == 1
  with pytest.raises(UserError, match="config.train.microbatches=True"):
    make_train_step(None, None, None, [], microbatches=True)
