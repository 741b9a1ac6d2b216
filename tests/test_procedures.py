"""Self-distillation and multi-teacher procedures: EMA teacher, teacher combination, born-again chains."""

import json
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdlab import data as kdata, losses, objective as objectives
from kdlab.config import apply_overrides, load
from kdlab.errors import UserError
from kdlab.objective import ModelOutput, Shapes, StepInputs
from kdlab.train import optim
from kdlab.train.prepare import prepare
from kdlab.train.loop import train
from kdlab.train.state import init_state
from kdlab.train.step import make_train_step

from conftest import ROOT, child_env, run_child

SELF = str(ROOT / "configs" / "self_distill_mnist.py")
QUICK = "source=digits,quick"


def test_ema_teacher_equals_hand_rolled_ema():
  config = load(f"{SELF}:ema,{QUICK}")
  config.ema_teacher.decay = 0.8
  setup = prepare(config)
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, state = init_state(setup.learner, tx, setup.objective.init_state(), config.seed, ema=True)
  step = jax.jit(make_train_step(graphdef, setup.objective, tx, [], setup.ema_decay))
  batches = kdata.train_dataset(setup.train_source, batch_size=config.data.batch_size, seed=0)
  expected = jax.tree.map(np.asarray, state.params)
  for i in range(4):
    state, metrics = step(state, [], {k: jnp.asarray(v) for k, v in batches[i].items()})
    expected = jax.tree.map(lambda e, p: 0.8 * e + 0.2 * np.asarray(p), expected, state.params)
    assert float(metrics["distill/kd"][0]) > 0 or i == 0  # The EMA teacher differs from the student after step 1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema, expected)


@pytest.mark.parametrize("decay", [1.0, -0.1, dict(schedule="linear", init=0.9, end=1.5, steps=10)])
def test_ema_decay_out_of_range_is_rejected(decay):
  config = load(f"{SELF}:ema,{QUICK}")
  config.ema_teacher = ml_collections.ConfigDict(dict(decay=decay))
  with pytest.raises(UserError, match=r"config.ema_teacher.decay must be in \[0, 1\)"):
    prepare(config)


def _two_teacher_shapes():
  s = ModelOutput(jax.ShapeDtypeStruct((3, 4), jnp.float32), {})
  return Shapes(s, [s, s], ["a", "b"], num_examples=10)


@pytest.mark.parametrize("method, extra", [("mean_probs", {}), ("mean_logits", {}),
                                           ("weighted", {"combine_weights": [3.0, 1.0]}), ("confidence", {})])
def test_multi_teacher_terms_match_combine_teachers(method, extra):
  obj = objectives.build([dict(loss="kd", temperature=2.0, from_teachers=["a", "b"], combine=method, **extra)],
                         _two_teacher_shapes(), nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(3), 3)
  s, ta, tb = (jax.random.normal(k, (3, 4)) * 3 for k in keys)
  labels = jnp.array([0, 2, 3])
  batch = {"label": labels, "mask": jnp.ones(3, bool), "index": jnp.arange(3)}
  loss, _, _ = obj({}, StepInputs(ModelOutput(s, {}), [ModelOutput(ta, {}), ModelOutput(tb, {})], batch,
                                  jnp.asarray(0), jax.random.key(0)), {})
  weights = jnp.asarray(extra["combine_weights"]) if "combine_weights" in extra else None
  target = losses.combine_teachers(jnp.stack([ta, tb]), method=method, temperature=2.0, weights=weights,
                                   labels=labels if method == "confidence" else None)
  np.testing.assert_allclose(loss, losses.kd(s, target, temperature=2.0).mean(), rtol=1e-5)


def test_multi_teacher_spec_errors():
  with pytest.raises(UserError, match=r"from_teacher='c' names no teacher"):
    objectives.build([dict(loss="kd", from_teachers=["a", "c"], combine="mean_probs")], _two_teacher_shapes(),
                     nnx.Rngs(0))
  with pytest.raises(UserError, match="combine='vote'"):
    objectives.build([dict(loss="kd", from_teachers=["a", "b"], combine="vote")], _two_teacher_shapes(), nnx.Rngs(0))


def test_self_teacher_is_the_stopped_student():
  shapes = _two_teacher_shapes()
  obj = objectives.build([dict(loss="kd", from_teacher="self")], shapes, nnx.Rngs(0))
  s = jax.random.normal(jax.random.key(1), (3, 4))
  batch = {"label": jnp.zeros(3, jnp.int32), "mask": jnp.ones(3, bool), "index": jnp.arange(3)}
  loss, _, _ = obj({}, StepInputs(ModelOutput(s, {}), [], batch, jnp.asarray(0), jax.random.key(0)), {})
  assert float(loss) == 0.0


def _ban_args(workdir):
  return [*__import__("conftest").kdlab_cmd("train", f"--config={SELF}:ban,{QUICK},generations=2",
                                            f"--workdir={workdir}", "--nowandb", "--no-progress")]


@pytest.fixture(scope="module")
def full_chain(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ban") / "full"
  run_child(_ban_args(workdir))
  return json.loads((workdir / "summary.json").read_text())


@pytest.mark.parametrize("kill_after", ["gen0/summary.json", "gen1/checkpoints/9"])
def test_born_again_chain_resumes_after_kill(tmp_path, full_chain, kill_after):
  """Killed between generations (gen0 done) or within one (gen1 mid-way): the chain ends as if uninterrupted."""
  proc = subprocess.Popen(_ban_args(tmp_path / "killed"), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not (tmp_path / "killed" / kill_after).exists():
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed" / "summary.json").exists()
  run_child(_ban_args(tmp_path / "killed"))
  full = full_chain
  resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert resumed["generations"] == full["generations"] and len(full["generations"]) == 3
  assert resumed["ensemble_test_accuracy"] == full["ensemble_test_accuracy"]


def test_born_again_rejects_bad_generations(tmp_path):
  config = load(f"{SELF}:ban,{QUICK}")
  config.born_again.generations = 0
  with pytest.raises(UserError, match="config.born_again.generations must be an integer >= 1"):
    train(config, tmp_path / "run", use_wandb=False, progress=False)
  assert not (tmp_path / "run").exists()


def test_byot_exits_all_train_and_are_evaluated(tmp_path):
  from kdlab.train.logging import read_metrics
  config = load(f"{ROOT / 'configs' / 'byot_mnist.py'}:byot,{QUICK}")
  train(config, tmp_path / "byot", use_wandb=False, progress=False)
  lines = read_metrics(tmp_path / "byot")
  train_lines = [l for l in lines if "loss" in l]
  for term in ("task/ce", "task/ce_exit1", "task/ce_exit2"):
    assert train_lines[-1][term] < 0.5 * train_lines[0][term], term
  final = [l for l in lines if "test/accuracy" in l][-1]
  for key in ("test/accuracy_exit1", "test/accuracy_exit2", "test/accuracy_exits_ensemble"):
    assert final[key] > 0.5, key  # chance is 0.1
