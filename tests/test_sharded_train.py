"""Parameter and batch sharding through ``kdlab train``: 8 simulated CPU devices, mesh data 2 x model 4.

The child process runs ``kdlab train`` (``cli.main``) and records what the loop actually holds: the
shard shape of every array of the train state it checkpoints (and of the state it restores after
an interruption) and of the first batch it feeds the step.
"""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest

from kdlab import cli

from conftest import ROOT, random_gpt_run, read_jsonl, run_child

LM = str(ROOT / "configs" / "lm_pysrc.py")
STEPS = 4  # lm_pysrc (steps=STEPS) checkpoints and evaluates every STEPS / 2 steps: a restore half way.
# kd from a (random, peaked) gpt teacher, with an EMA teacher of the student too.
ARGS = ["--nowandb", "--no-progress", "--config.ema_teacher={'decay': 0.9}"]
SHARDED = ["--config.mesh=[('data', 2), ('model', 4)]",
           "--config.sharding_rules=[('vocab', 'model'), ('heads', 'model'), ('mlp', 'model')]"]

# Stops ``kdlab train`` after its first checkpoint, reruns it (a resume), and prints the shard shapes
# ``[global shape, shard shape]`` of the restored state, of the state saved last and of the first batch.
_CHILD = """
import json, sys
import jax
from kdlab import cli
from kdlab import mesh
from kdlab.train import checkpoint, teachers

def shards(tree):
  return {jax.tree_util.keystr(p): [list(x.shape), list(x.sharding.shard_shape(x.shape))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

seen = {"saves": 0}
save, restore, to_global = checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore, mesh.global_batch
load_teachers = teachers.load_teachers

def save_then_stop(self, step, state, data_state):
  save(self, step, state, data_state)
  seen["saves"] += 1
  seen["saved"] = shards(state)
  if seen["saves"] == 1:
    raise KeyboardInterrupt

def restore_and_record(self, like, step=None):
  state, data = restore(self, like, step)
  seen["restored"] = shards(state)
  return state, data

def global_and_record(batch, mesh, stacked=False):
  out = to_global(batch, mesh, stacked)
  seen.setdefault("batch", shards(out))
  return out

def load_teachers_and_record(*args, **kwargs):
  teachers, variables = load_teachers(*args, **kwargs)
  seen["teacher"] = shards(variables)
  return teachers, variables

checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore = save_then_stop, restore_and_record
mesh.global_batch, teachers.load_teachers = global_and_record, load_teachers_and_record
try:
  cli.main(sys.argv[1:])
except KeyboardInterrupt:
  pass
code = cli.main(sys.argv[1:])
print("SEEN " + json.dumps(seen))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return random_gpt_run(tmp_path_factory.mktemp("teacher"))


def _config(teacher) -> str:
  return f"--config={LM}:kd,quick,steps={STEPS},teacher={teacher}"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, teacher):
  workdir = tmp_path_factory.mktemp("sharded") / "run"
  proc = run_child([sys.executable, "-c", _CHILD, "train", _config(teacher), f"--workdir={workdir}", *ARGS,
                    *SHARDED], devices=8, timeout=600)
  seen = json.loads(proc.stdout.split("SEEN ", 1)[1].splitlines()[0])
  return workdir, seen


def _split_dims(name: str) -> tuple[int, ...]:
  """The dimensions the rules split over ``model`` (4): vocab, heads and mlp, by the GPT's layout."""
  if name.endswith("['embed']['embedding']"):  # (vocab, embed)
    return (0,)
  if re.search(r"\['(query|key|value)'\]\['kernel'\]$", name) or name.endswith("['up']['kernel']"):
    return (1,)  # (embed, heads) / (embed, mlp)
  if name.endswith("['out']['kernel']") or name.endswith("['down']['kernel']"):
    return (0,)  # (heads, embed) / (mlp, embed)
  assert name.endswith("['scale']"), name  # RMSNorm scales: (embed,), no rule: whole
  return ()


def _copies_of_params(state: dict) -> dict[str, list]:
  """Params, the optimizer's moments and the EMA copy: every array laid out like a parameter."""
  return {k: v for k, v in state.items() if k.startswith((".params", ".ema", ".opt_state[0].mu", ".opt_state[0].nu"))}


@pytest.mark.parametrize("which", ["saved", "restored"])
def test_params_moments_and_ema_are_split_over_model_by_the_rules(sharded, which):
  state = sharded[1][which]
  copies = _copies_of_params(state)
  kinds = {k.split("[")[0].split("['")[0] for k in copies}
  assert {".params", ".ema"} <= kinds and any(k.startswith(".opt_state[0].mu") for k in copies)
  assert len(copies) == 4 * sum(k.startswith(".params") for k in copies)  # params, mu, nu, ema
  for name, (shape, shard) in copies.items():
    want = [d // 4 if i in _split_dims(name) else d for i, d in enumerate(shape)]
    assert shard == want, (name, shape, shard)
  params = {k: v for k, v in copies.items() if k.startswith(".params")}
  total = sum(math.prod(s) for s, _ in params.values())
  per_device = sum(math.prod(s) for _, s in params.values())
  assert per_device < 0.3 * total  # all but the norm scales split four ways
  assert state[".params['student']['embed']['embedding']"] == [[256, 32], [64, 32]]
  rest = {k: v for k, v in state.items() if k not in copies}
  assert rest and all(shape == shard for shape, shard in rest.values())  # step, key, counts: replicated


def test_teacher_params_are_split_over_model_by_the_rules(sharded):
  params = {k: v for k, v in sharded[1]["teacher"].items() if k.startswith("[0][0]")}  # teacher 0's params
  assert len(params) > 5 and params["[0][0]['embed']['embedding']"] == [[256, 32], [64, 32]]
  for name, (shape, shard) in params.items():
    assert shard == [d // 4 if i in _split_dims(name) else d for i, d in enumerate(shape)], name


def test_the_batch_is_split_over_the_data_axis(sharded):
  batch = sharded[1]["batch"]
  assert batch["['tokens']"] == [[8, 32], [4, 32]]
  assert all(shard[0] == shape[0] // 2 for shape, shard in batch.values())


def test_sharded_resumed_run_logs_the_single_device_losses(sharded, teacher, tmp_path):
  workdir, seen = sharded
  assert seen["saves"] == 2  # the stopped run's save half way, then the resumed run's at the end
  single = tmp_path / "single"
  assert cli.main(["train", _config(teacher), f"--workdir={single}", *ARGS]) == 0
  want, got = read_jsonl(single / "metrics.jsonl"), read_jsonl(workdir / "metrics.jsonl")
  assert [l["step"] for l in got] == [l["step"] for l in want]
  assert got[0]["distill/kd"] > 0.5  # the teacher's signal is real
  for key in ("loss", "distill/kd", "val/loss", "val/kl_teacher", "l2_params"):
    np.testing.assert_allclose([l[key] for l in got if key in l], [l[key] for l in want if key in l], rtol=1e-5)
  assert json.loads((workdir / "summary.json").read_text())["val_loss"] == pytest.approx(
      json.loads((single / "summary.json").read_text())["val_loss"], rel=1e-5)


@pytest.mark.parametrize("devices, mesh, rules, message", [
    (1, "[('data', -1)]", "[('vocab', 'model')]",
     "config.sharding_rules: ('vocab', 'model') names mesh axis 'model', which config.mesh {'data': 1} lacks"),
    (3, "[('data', 1), ('model', 3)]", "[('vocab', 'model')]",
     "config.teachers[0].model parameter embed/embedding [256, 32]: its 'vocab' dimension 256 is not divisible "
     "by mesh axis 'model' of size 3; change config.mesh or the rule for 'vocab'"),
])
def test_rule_the_mesh_cannot_honour_is_a_one_line_error_before_writing(tmp_path, teacher, devices, mesh, rules,
                                                                        message):
  workdir = tmp_path / "run"
  proc = run_child([sys.executable, "-m", "kdlab", "train", _config(teacher), f"--workdir={workdir}", *ARGS,
                    f"--config.mesh={mesh}",
                    f"--config.sharding_rules={rules}"], devices=devices, check=False, timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith("kdlab: error: "), proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
  assert not workdir.exists()
