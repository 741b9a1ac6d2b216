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

from conftest import ROOT, child_env, run_child, tree_snapshot

SELF = str(ROOT / "configs" / "self_distill_mnist.py")
QUICK = "source=digits,quick"


def test_ema_teacher_equals_hand_rolled_ema():
  config = load(f"{SELF}:ema,{QUICK}")
  config.ema_teacher.decay = 0.8
  setup = prepare(config)
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, state = init_state(setup.make_learner(), tx, setup.objective.init_state(), config.seed, ema=True)
  step = jax.jit(make_train_step(graphdef, setup.objective, tx, [], setup.ema_decay))
  batches = kdata.train_dataset(setup.train_source, batch_size=config.data.batch_size, seed=0)
  expected = jax.tree.map(np.asarray, state.params)
  for i in range(4):
    state, metrics = step(state, [], {k: jnp.asarray(v) for k, v in batches[i].items()})
    expected = jax.tree.map(lambda e, p: 0.8 * e + 0.2 * np.asarray(p), expected, state.params)
    assert float(metrics["distill/kd"][0]) > 0 or i == 0  # The EMA teacher differs from the student after step 1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema, expected)


def _saved_state(checkpoints, step: int) -> dict:
  """The train state a run saved at ``step``, as orbax stored it (pure dicts)."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state")


def _assert_trees_equal(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ema_teacher_resumes_from_its_checkpoint(tmp_path, monkeypatch):
  """A killed EMA run restarted: the EMA comes back from the checkpoint (not from the student or a fresh
  init), only the remaining steps run, and the run ends with the uninterrupted run's EMA and student."""
  import shutil
  from kdlab.train.checkpoint import Checkpointer
  from conftest import read_jsonl
  config = load(f"{SELF}:ema,{QUICK}")
  full, killed = tmp_path / "full", tmp_path / "killed"
  train(config, full, use_wandb=False, progress=False)
  earlier, last = sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())
  # The state a run killed between its last two checkpoints leaves behind.
  shutil.copytree(full, killed)
  shutil.rmtree(killed / "checkpoints" / str(last))
  (killed / "summary.json").unlink()
  saved = _saved_state(killed / "checkpoints", earlier)
  restored, restore = [], Checkpointer.restore

  def spy(self, like, step=None):
    state, data = restore(self, like, step)
    restored.append((int(state.step), jax.tree.map(np.array, state.ema)))  # (the loop donates the state)
    return state, data

  monkeypatch.setattr(Checkpointer, "restore", spy)
  train(config, killed, use_wandb=False, progress=False)
  ((step, ema),) = restored
  assert step == earlier
  _assert_trees_equal(ema, saved["ema"])
  assert any(not np.array_equal(e, p) for e, p in zip(jax.tree.leaves(saved["ema"]), jax.tree.leaves(saved["params"])))
  ends = _saved_state(full / "checkpoints", last), _saved_state(killed / "checkpoints", last)
  _assert_trees_equal(ends[1]["ema"], ends[0]["ema"])
  _assert_trees_equal(ends[1]["params"], ends[0]["params"])
  losses_of = lambda w: [(l["step"], l["loss"]) for l in read_jsonl(w / "metrics.jsonl") if "loss" in l]  # noqa: E731
  assert losses_of(killed) == losses_of(full)


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
  """from_teacher="self": the value is KD against the student's own tap, and no gradient flows into that tap."""
  shapes = _two_teacher_shapes()
  obj = objectives.build([dict(loss="kd", from_teacher="self")], shapes, nnx.Rngs(0))
  s = jax.random.normal(jax.random.key(1), (3, 4))
  batch = {"label": jnp.zeros(3, jnp.int32), "mask": jnp.ones(3, bool), "index": jnp.arange(3)}
  loss, _, _ = obj({}, StepInputs(ModelOutput(s, {}), [], batch, jnp.asarray(0), jax.random.key(0)), {})
  assert float(loss) == 0.0
  # A shallow exit taught by the deep logits of the same network (BYOT): the gradient reaches the exit
  # only, as if the logits were a constant; without the stop-gradient the logits would get one too.
  exit_shape = jax.ShapeDtypeStruct((3, 4), jnp.float32)
  shapes = Shapes(ModelOutput(exit_shape, {"exit": exit_shape}), [], [], num_examples=10)
  obj = objectives.build([dict(loss="kd", student="exit", teacher="logits", from_teacher="self", temperature=2.0)],
                         shapes, nnx.Rngs(0))
  out = ModelOutput(s, {"exit": jax.random.normal(jax.random.key(2), (3, 4))})

  def objective(o):
    return obj({}, StepInputs(o, [], batch, jnp.asarray(0), jax.random.key(0)), {})[0]

  grads = jax.grad(objective)(out)
  constant = jax.grad(lambda e: losses.kd(e, s, temperature=2.0).mean())(out.feats["exit"])
  unstopped = jax.grad(lambda o: losses.kd(o.feats["exit"], o.logits, temperature=2.0).mean())(out)
  np.testing.assert_allclose(grads.feats["exit"], constant, rtol=1e-5)
  assert np.abs(constant).max() > 0 and np.all(np.asarray(grads.logits) == 0.0)
  assert np.abs(unstopped.logits).max() > 1e-3  # what a missing stop-gradient would give the teacher tap


def _ban_args(workdir):
  return [*__import__("conftest").kdlab_cmd("train", f"--config={SELF}:ban,{QUICK},generations=2",
                                            f"--workdir={workdir}", "--nowandb", "--no-progress")]


@pytest.fixture(scope="module")
def full_chain(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ban") / "full"
  run_child(_ban_args(workdir))
  return workdir, json.loads((workdir / "summary.json").read_text())


def test_born_again_generations_are_seeded_and_taught_as_documented(full_chain):
  """docs/procedures.md: generation 0 trains on labels with the chain's seed; generation k >= 1 starts from
  seed + k and distils from generation k-1's checkpoint (the teacher named "previous")."""
  workdir, _ = full_chain
  chain = json.loads((workdir / "config.json").read_text())
  for k in range(3):
    config = json.loads((workdir / f"gen{k}" / "config.json").read_text())
    assert config["seed"] == chain["seed"] + k and config["born_again"] is None
    if k == 0:
      assert config["teachers"] == [] and config["objective"] == chain["born_again"]["first_objective"]
    else:
      assert config["teachers"] == [dict(init=str(workdir / f"gen{k - 1}" / "checkpoints"), name="previous")]
      assert config["objective"] == chain["objective"]
    lines = [json.loads(l) for l in (workdir / f"gen{k}" / "metrics.jsonl").read_text().splitlines()]
    assert ("distill/kd" in lines[0]) == (k > 0)
  # Fresh initializations: each generation's student differs from its teacher's.
  last = lambda c: max(int(p.name) for p in c.iterdir() if p.name.isdigit())  # noqa: E731
  params = [_saved_state(c, last(c))["params"] for c in (workdir / f"gen{k}" / "checkpoints" for k in range(3))]
  for a, b in zip(params, params[1:]):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kill_after", ["gen0/summary.json", "gen1/checkpoints/9"])
def test_born_again_chain_resumes_after_kill(tmp_path, request, kill_after, monkeypatch):
  """Killed between generations (gen0 done) or within one (gen1 mid-way), then restarted: finished generations
  are neither retrained nor rewritten, the interrupted one resumes from its last checkpoint and saves only
  later steps, and the chain ends as if uninterrupted."""
  from kdlab.train.checkpoint import Checkpointer
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_ban_args(killed), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not (killed / kill_after).exists():
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "summary.json").exists()
  gens = [killed / f"gen{k}" for k in range(3)]
  finished = [g for g in gens if (g / "summary.json").exists()]
  assert gens[0] in finished and gens[2] not in finished
  before = {g: tree_snapshot(g) for g in finished}

  def latest(g):
    if not (g / "checkpoints").is_dir():
      return None
    ckpt = Checkpointer(g / "checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    return step

  at_kill = {g.name: latest(g) for g in gens if g not in finished}
  if kill_after.startswith("gen1/checkpoints"):
    assert at_kill["gen1"] is not None and at_kill["gen1"] >= 9
  restores, saves, restore, save = [], [], Checkpointer.restore, Checkpointer.save

  def restore_spy(self, like, step=None):
    state, data = restore(self, like, step)
    restores.append((self.directory.parent.name, int(state.step)))
    return state, data

  def save_spy(self, step, state, data_state):
    saves.append((self.directory.parent.name, step))
    return save(self, step, state, data_state)

  monkeypatch.setattr(Checkpointer, "restore", restore_spy)
  monkeypatch.setattr(Checkpointer, "save", save_spy)
  train(load(f"{SELF}:ban,{QUICK},generations=2"), killed, use_wandb=False, progress=False)
  for g in finished:
    assert tree_snapshot(g) == before[g], g.name
    assert not [r for r in restores if r[0] == g.name] and not [s for s in saves if s[0] == g.name]
  for name, step in at_kill.items():
    assert [r[1] for r in restores if r[0] == name] == ([] if step is None else [step]), name
    assert saves and all(s[1] > (step or 0) for s in saves if s[0] == name), name
  _, full = request.getfixturevalue("full_chain")  # (only now: a failure above costs no uninterrupted chain)
  resumed = json.loads((killed / "summary.json").read_text())
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
