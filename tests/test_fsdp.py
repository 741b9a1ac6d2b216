"""FSDP x tensor parallelism through ``kdlab train`` on simulated CPU devices, and checkpoints that scale.

Each child process runs ``kdlab train`` (``cli.main``) and records what the run really holds: the
shard shape of every array of the state it saves and restores and of each teacher's variables,
and whether the learner was built inside a trace (born sharded: no whole copy on one device).
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest

from kdlab import cli

from conftest import ROOT, random_gpt_run, read_jsonl, run_child

LM = str(ROOT / "configs" / "lm_pysrc.py")
STEPS = 4  # lm_pysrc quick (steps=4) checkpoints and evaluates at steps 2 and 4.
ARGS = ["--nowandb", "--no-progress", "--config.ema_teacher={'decay': 0.9}"]
TEACHER_MODEL = dict(d_model=64, num_heads=4)  # every split dimension divisible by 2 and 4

_CHILD = """
import json, sys
import jax
from kdlab import cli
from kdlab.train import checkpoint, state, teachers

def shards(tree):
  return {jax.tree_util.keystr(p): [list(x.shape), list(x.sharding.shard_shape(x.shape))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

seen = {"saves": 0, "traced": []}
stop_after_first = sys.argv[1] == "stop"
save, restore, load = checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore, teachers.load_teachers
init = state.init_state

def save_and_record(self, step, st, data_state):
  save(self, step, st, data_state)
  seen["saves"] += 1
  seen.setdefault("saved", shards(st))
  if stop_after_first:
    raise KeyboardInterrupt

def restore_and_record(self, like, step=None):
  st, data = restore(self, like, step)
  seen["restored"] = shards(st)
  return st, data

def load_and_record(*args, **kwargs):
  ts, variables = load(*args, **kwargs)
  seen["teacher"] = shards(variables)
  return ts, variables

def init_and_record(learner, *args, **kwargs):
  leaf = jax.tree.leaves(state.split_learner(learner)[1])[0]
  seen["traced"].append(isinstance(leaf, jax.core.Tracer))
  return init(learner, *args, **kwargs)

checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore = save_and_record, restore_and_record
teachers.load_teachers, state.init_state = load_and_record, init_and_record
try:
  code = cli.main(sys.argv[2:])
except KeyboardInterrupt:
  code = 0
print("SEEN " + json.dumps(seen))
sys.exit(code)
"""


def _train_child(mode: str, args: list[str], devices: int) -> dict:
  proc = run_child([sys.executable, "-c", _CHILD, mode, "train", *args], devices=devices, timeout=600)
  return json.loads(proc.stdout.split("SEEN ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return random_gpt_run(tmp_path_factory.mktemp("teacher"), **TEACHER_MODEL)


def _config(teacher) -> list[str]:
  return [f"--config={LM}:kd,quick,steps={STEPS},teacher={teacher}", *ARGS]


@pytest.fixture(scope="module")
def single(tmp_path_factory, teacher):
  workdir = tmp_path_factory.mktemp("single") / "run"
  assert cli.main(["train", *_config(teacher), f"--workdir={workdir}"]) == 0
  return workdir


def _check_losses_equal(got_dir, want_dir) -> None:
  want, got = read_jsonl(want_dir / "metrics.jsonl"), read_jsonl(got_dir / "metrics.jsonl")
  assert [l["step"] for l in got] == [l["step"] for l in want]
  assert got[0]["distill/kd"] > 0.1  # the teacher's signal is real
  for key in ("loss", "distill/kd", "val/loss", "val/kl_teacher", "l2_params"):
    np.testing.assert_allclose([l[key] for l in got if key in l], [l[key] for l in want if key in l], rtol=2e-5)


# --- data 2 x fsdp 2 x model 2 with the default rules -------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_tp(tmp_path_factory, teacher):
  """A run stopped at its first checkpoint on 8 devices (data 2 x fsdp 2 x model 2) and resumed to its
  end on 4 (fsdp 4): the workdir, what the first run held and what the resumed one held."""
  workdir = tmp_path_factory.mktemp("fsdp_tp") / "run"
  seen = _train_child("stop", [*_config(teacher), f"--workdir={workdir}",
                               "--config.mesh=[('data', 2), ('fsdp', 2), ('model', 2)]"], devices=8)
  resumed = _train_child("run", [*_config(teacher), f"--workdir={workdir}", "--config.mesh=[('fsdp', 4)]"], devices=4)
  return workdir, seen, resumed


def _expected(name: str, shape: list[int]) -> list[int]:
  """The default rules on the gpt: vocab, heads and mlp over ``model`` (2), embed over ``fsdp`` (2)."""
  split = {"['embed']['embedding']": (2, 2),  # (vocab, embed)
           "['query']['kernel']": (2, 2), "['key']['kernel']": (2, 2), "['value']['kernel']": (2, 2),
           "['up']['kernel']": (2, 2),  # (embed, heads|mlp)
           "['out']['kernel']": (2, 2), "['down']['kernel']": (2, 2),  # (heads|mlp, embed)
           "['scale']": (2,)}  # RMSNorm (embed,)
  for suffix, factors in split.items():
    if name.endswith(suffix):
      return [d // f for d, f in zip(shape, factors)]
  raise AssertionError(f"unexpected parameter {name}")


def test_params_moments_ema_and_teacher_are_split_over_fsdp_and_model(fsdp_tp):
  _, seen, _ = fsdp_tp
  state = seen["saved"]
  copies = {k: v for k, v in state.items() if k.startswith((".params", ".ema", ".opt_state[0].mu", ".opt_state[0].nu"))}
  assert len(copies) == 4 * sum(k.startswith(".params") for k in copies) > 20  # params, mu, nu, ema
  for name, (shape, shard) in copies.items():
    assert shard == _expected(name, shape), (name, shape, shard)
  assert state[".params['student']['embed']['embedding']"] == [[256, 32], [128, 16]]
  teacher = {k: v for k, v in seen["teacher"].items() if k.startswith("[0][0]")}
  assert teacher["[0][0]['embed']['embedding']"] == [[256, 64], [128, 32]]
  for name, (shape, shard) in teacher.items():
    assert shard == _expected(name, shape), name
  total = sum(np.prod(s) for s, _ in copies.values())
  assert sum(np.prod(s) for _, s in copies.values()) < 0.26 * total  # all but the norm scales split 4 ways


def test_the_learner_is_built_inside_the_sharded_jit(fsdp_tp):
  assert fsdp_tp[1]["traced"] and all(fsdp_tp[1]["traced"])


def test_fsdp_tp_run_logs_the_single_device_losses(fsdp_tp, single):
  _check_losses_equal(fsdp_tp[0], single)


# --- a small student data-parallel, the teacher FSDP x TP on its own rules, in bfloat16 ---------------


def test_teacher_sharded_on_its_own_rules_in_its_own_dtype(tmp_path, teacher):
  rules = "[('embed', 'fsdp'), ('vocab', 'model'), ('heads', 'model'), ('mlp', 'model')]"
  seen = _train_child("stop", [*_config(teacher), f"--workdir={tmp_path / 'run'}",
                               "--config.mesh=[('fsdp', 4), ('model', 2)]",
                               "--config.sharding_rules=[('embed', None), ('vocab', None), ('heads', None), "
                               "('mlp', None)]",
                               f"--config.teachers[0].sharding_rules={rules}",
                               "--config.teachers[0].dtype=bfloat16"], devices=8)
  student = {k: v for k, v in seen["saved"].items() if k.startswith(".params")}
  assert student and all(shape == shard for shape, shard in student.values())  # replicated
  teacher_params = {k: v for k, v in seen["teacher"].items() if k.startswith("[0][0]")}
  assert teacher_params["[0][0]['embed']['embedding']"] == [[256, 64], [128, 16]]
  assert teacher_params["[0][0]['blocks'][0]['mlp']['up']['kernel']"] == [[64, 256], [16, 128]]


def test_teacher_dtype_is_its_stored_dtype(teacher):
  from kdlab.train import teachers
  import jax
  spec = teachers.teacher_spec(dict(init=str(teacher), dtype="bfloat16"), 0)
  _, variables = teachers.load_teachers([spec], __import__("kdlab").mesh.make_mesh([("data", -1)]))
  assert {str(x.dtype) for x in jax.tree.leaves(variables[0][0])} == {"bfloat16"}


# --- checkpoints: resumed on another mesh, kept, best, asynchronous -----------------------------------


def test_run_saved_on_8_devices_resumes_on_4_resharded_with_the_same_results(fsdp_tp, single):
  workdir, first, resumed = fsdp_tp  # saved split over (fsdp, model), restored split over fsdp alone
  assert first["saves"] == 1 and first["saved"][".params['student']['embed']['embedding']"] == [[256, 32], [128, 16]]
  assert resumed["restored"][".params['student']['embed']['embedding']"] == [[256, 32], [256, 8]]
  assert resumed["restored"][".opt_state[0].mu['student']['embed']['embedding']"] == [[256, 32], [256, 8]]
  _check_losses_equal(workdir, single)
  want = json.loads((single / "summary.json").read_text())
  got = json.loads((workdir / "summary.json").read_text())
  assert got["val_loss"] == pytest.approx(want["val_loss"], rel=2e-5)


def test_keep_and_best_checkpoint(tmp_path, teacher):
  workdir = tmp_path / "run"
  assert cli.main(["train", *_config(teacher).__iter__(), f"--workdir={workdir}",
                   "--config.train.num_steps=6", "--config.train.checkpoint_every_epochs=0.015625",
                   "--config.train.eval_every_epochs=0.015625", "--config.checkpoint.keep=3",
                   "--config.checkpoint.best_metric=val/kl_teacher"]) == 0
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [4, 5, 6]
  evals = [l for l in read_jsonl(workdir / "metrics.jsonl") if "val/kl_teacher" in l]
  assert len(evals) == 6
  best = min(evals, key=lambda l: l["val/kl_teacher"])
  record = json.loads((workdir / "best_checkpoint" / "best.json").read_text())
  assert record == {"step": best["step"], "metric": "val/kl_teacher", "mode": "min", "value": best["val/kl_teacher"]}
  assert [p.name for p in (workdir / "best_checkpoint").iterdir() if p.name.isdigit()] == [str(best["step"])]


def test_unknown_best_metric_is_a_one_line_error_before_writing(tmp_path, teacher):
  workdir = tmp_path / "run"
  proc = run_child([sys.executable, "-m", "kdlab", "train", *_config(teacher), f"--workdir={workdir}",
                    "--config.checkpoint.best_metric=val/bleu"], check=False, timeout=300)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  assert "kdlab: error: config.checkpoint.best_metric='val/bleu': not an eval metric of this run; use one of" \
      in proc.stderr and "val/kl_teacher" in proc.stderr
  assert not workdir.exists()


def test_save_is_asynchronous_and_waited_for(tmp_path, monkeypatch):
  """Checkpointer.save returns while the write is still blocked; wait() and close() complete it."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from kdlab.train.checkpoint import Checkpointer
  from kdlab.train.state import TrainState
  release, writing = threading.Event(), threading.Event()
  handler = ocp.handlers.JsonCheckpointHandler
  write = handler.async_save

  class Held:
    """A commit future of the JSON item that completes once ``release`` is set: orbax waits on it in
    the background before it finalizes the checkpoint, so a synchronous save would block on it."""

    def result(self, timeout=None):
      writing.set()
      release.wait(30)

  async def slow_save(self, *args, **kwargs):
    return [*(await write(self, *args, **kwargs) or []), Held()]

  monkeypatch.setattr(handler, "async_save", slow_save)
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, rest={}, opt_state={},
                     term_states={}, key=jnp.zeros(2, jnp.uint32))
  ckpt = Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, state, {"pos": 1})
  assert writing.wait(30)
  assert not (tmp_path / "checkpoints" / "1").exists()  # still being written (a temporary folder)
  release.set()
  ckpt.wait()
  assert ckpt.latest_step() == 1 and (tmp_path / "checkpoints" / "1" / "state").is_dir()
  ckpt.close()


# --- a CIFAR-zoo CNN under FSDP -------------------------------------------------------------------------

ZOO = [f"--config={ROOT / 'configs' / 'mnist5k_resnet.py'}:student,quick,source=digits", *ARGS[:2],
       "--config.train.num_steps=4", "--config.train.eval_every_epochs=0.02",
       "--config.train.checkpoint_every_epochs=100.0"]


def test_zoo_cnn_is_split_over_fsdp_and_logs_the_single_device_losses(tmp_path):
  single = tmp_path / "single"
  assert cli.main(["train", *ZOO, f"--workdir={single}"]) == 0
  sharded = tmp_path / "fsdp"
  seen = _train_child("run", [*ZOO, f"--workdir={sharded}", "--config.mesh=[('fsdp', 8)]"], devices=8)
  state = seen["saved"]
  conv = ".params['student']['stem']['conv']['kernel']"
  assert state[conv] == [[3, 3, 1, 16], [3, 3, 1, 2]], {k: v for k, v in state.items() if "stem" in k}
  moments = [v for k, v in state.items() if k.startswith(".opt_state") and k.endswith("['stem']['conv']['kernel']")]
  assert moments and all(m == [[3, 3, 1, 16], [3, 3, 1, 2]] for m in moments)  # SGD's momentum
  head = [k for k in state if k.startswith(".params['student']") and k.endswith("['kernel']") and len(state[k][0]) == 2]
  assert head and all(state[k][1] == [state[k][0][0] // 8, 10] for k in head)  # 64 channels x 10 classes
  want, got = read_jsonl(single / "metrics.jsonl"), read_jsonl(sharded / "metrics.jsonl")
  assert [l["step"] for l in got] == [l["step"] for l in want] and len(want) >= 2
  for key in ("loss", "l2_params", "test/accuracy"):
    np.testing.assert_allclose([l[key] for l in got if key in l], [l[key] for l in want if key in l], rtol=1e-4)


# --- mixed precision ----------------------------------------------------------------------------------


def test_bfloat16_run_trains_with_float32_master_weights(tmp_path):
  workdir = tmp_path / "run"
  assert cli.main(["train", f"--config={LM}:teacher,quick,steps=16", f"--workdir={workdir}", *ARGS[:2],
                   "--config.dtype=bfloat16", "--config.train.log_every_steps=4"]) == 0
  from conftest import checkpoint_contents
  arrays, _ = checkpoint_contents(workdir / "checkpoints", 16)
  params = {k: v for k, v in arrays.items() if k[:2] == ("params", "student")}
  moments = {k: v for k, v in arrays.items() if k[0] == "opt_state" and "student" in k}
  assert len(params) > 5 and {v.dtype for v in params.values()} == {np.dtype("float32")}
  assert moments and {v.dtype for v in moments.values()} == {np.dtype("float32")}
  losses = [l["loss"] for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses


def test_bfloat16_student_computes_in_bfloat16():
  from kdlab import config as kconfig
  from kdlab.train.prepare import prepare
  setup = prepare(kconfig.apply_overrides(kconfig.load(f"{LM}:teacher,quick"), ["--config.dtype=bfloat16"]))
  assert setup.student_kwargs["dtype"] == "bfloat16" and setup.learner.student.dtype == np.dtype("bfloat16")
  assert setup.shapes.student.feats["block0"].dtype == np.dtype("bfloat16")
  assert setup.shapes.student.logits.dtype == np.dtype("float32")


# --- rules the mesh cannot honour -------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["--config.sharding_rules=[('vocab', 'data'), ('embed', 'data')]"],
     "config.sharding_rules: config.teachers[0].model parameter embed/embedding maps two dimensions to mesh axis "
     "'data'; map its names ('vocab', 'embed') to different axes"),
    (["--config.teachers[0].sharding_rules=[('mlp', 'model')]"],
     "config.teachers[0].sharding_rules: ('mlp', 'model') names mesh axis 'model', which config.mesh {'data': 1} "
     "lacks; add it to config.mesh or map 'mlp' to one of data (or None)"),
    (["--config.sharding_rules=[('vocab',)]"],
     "config.sharding_rules: ('vocab',) is not a (logical name, mesh axis) pair"),
    (["--config.teachers[0].sharding_rules='embed'"],
     "config.teachers[0].sharding_rules: 'embed' is not a list of (logical name, mesh axis) pairs"),
    (["--config.teachers[0].dtype='int8'"], "config.teachers[0].dtype='int8': use one of float32, bfloat16, float16"),
])
def test_bad_rule_or_dtype_is_a_one_line_error_before_writing(tmp_path, teacher, capsys, overrides, message):
  workdir = tmp_path / "run"
  assert cli.main(["train", *_config(teacher), f"--workdir={workdir}", *overrides]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and err.startswith("kdlab: error: ") and message in err, err
  assert not workdir.exists()
