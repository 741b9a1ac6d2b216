"""End to end on the embedded 8x8 digits: teacher -> distilled student, outputs, CLI errors."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdlab import cli
from kdlab.config import apply_overrides, load
from kdlab.data import load as load_source
from kdlab.train import checkpoint
from kdlab.train.evaluate import evaluate_run
from kdlab.train.loop import train

from conftest import (HINTON, assert_same_arrays, checkpoint_contents, count_train_steps, kill_after_first_checkpoint,
                      read_jsonl, tree_snapshot, watch_resume)

QUICK = "source=digits,quick"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A folder with a finished run ``teacher`` (``runs`` adds ``kd``, distilled from it)."""
  root = tmp_path_factory.mktemp("runs")
  teacher = load(f"{HINTON}:teacher,{QUICK}")
  train(teacher, root / "teacher", use_wandb=False, progress=False)
  return root


@pytest.fixture(scope="module")
def runs(teacher_run):
  kd = load(f"{HINTON}:kd,{QUICK}")
  kd.teachers[0]["init"] = str(teacher_run / "teacher" / "checkpoints")
  train(kd, teacher_run / "kd", use_wandb=False, progress=False)
  return teacher_run


def test_run_writes_config_metrics_checkpoints_summary(runs):
  kd = runs / "kd"
  assert {p.name for p in kd.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoints", "summary.json"}
  summary = json.loads((kd / "summary.json").read_text())
  for key in ("test_accuracy", "test_errors", "agreement_top1", "kl_teacher", "wall_time_s", "steps_per_s"):
    assert summary[key] is not None, key
  assert summary["test_accuracy"] > 0.5  # 1 epoch on digits with a 32-unit MLP: far above chance (0.1).
  assert summary["test_errors"] == round((1 - summary["test_accuracy"]) * summary["test_examples"])
  lines = [json.loads(l) for l in (kd / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert {"task/ce", "distill/kd", "l2_grads", "l2_params", "l2_updates", "train/accuracy"} <= set(train_lines[0])
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert json.loads((kd / "config.json").read_text())["objective"][1]["temperature"] == 20.0


def test_evaluate_run_matches_summary_and_applies_offsets(runs):
  summary = json.loads((runs / "kd" / "summary.json").read_text())
  again = evaluate_run(runs / "kd")
  assert again["test/errors"] == summary["test_errors"]
  offset = np.zeros(10, np.float32)
  offset[3] = 1e6  # Everything is predicted a 3: only the 3s are right.
  biased = evaluate_run(runs / "kd", logit_offset=offset)
  assert biased["test/errors_per_class"][3] == 0
  threes = int(np.sum(load_source("digits", "test").labels() == 3))
  assert biased["test/errors"] == summary["test_examples"] - threes


def test_finished_run_rerun_trains_no_step_and_changes_no_file(teacher_run, monkeypatch):
  before = tree_snapshot(teacher_run / "teacher")
  steps = count_train_steps(monkeypatch)
  config = load(f"{HINTON}:teacher,{QUICK}")
  summary = train(config, teacher_run / "teacher", use_wandb=False, progress=False)
  jax.effects_barrier()
  assert steps == []
  assert summary == json.loads((teacher_run / "teacher" / "summary.json").read_text())
  assert tree_snapshot(teacher_run / "teacher") == before  # Same files, bytes and mtimes.


def test_killed_run_resumes_only_the_remaining_steps_from_its_saved_state(teacher_run, tmp_path, monkeypatch):
  config = load(f"{HINTON}:teacher,{QUICK}")  # Dropout: the RNG state must be restored too.
  workdir = tmp_path / "teacher"
  first, drawn = kill_after_first_checkpoint(monkeypatch, lambda: train(config, workdir, use_wandb=False,
                                                                         progress=False))
  lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
  kept = [l for l in lines if json.loads(l)["step"] <= first]
  assert kept and len(kept) < len(lines) and not (workdir / "summary.json").exists()  # Logged past it.
  stored_state, stored_data = checkpoint_contents(workdir / "checkpoints", first)
  seen = watch_resume(monkeypatch)
  resumed = train(config, workdir, use_wandb=False, progress=False)
  jax.effects_barrier()
  full = json.loads((teacher_run / "teacher" / "summary.json").read_text())
  assert sorted(seen["steps"]) == list(range(first, full["steps"]))
  [(directory, step, state, data_state)] = seen["restored"]
  assert directory == workdir / "checkpoints" and step == first and state[("step",)] == first
  assert_same_arrays(state, stored_state)
  assert data_state == stored_data
  # The iterator continues where the killed run was: its next batch is the one the killed run drew next.
  assert len(seen["batches"]) == full["steps"] - first
  for key, value in drawn[first].items():
    np.testing.assert_array_equal(seen["batches"][0][key], value, err_msg=key)
  # The earlier lines are kept byte for byte; the killed run's lines after the checkpoint are replaced.
  assert (workdir / "metrics.jsonl").read_text().startswith("".join(kept))
  assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(teacher_run / "teacher" / "metrics.jsonl")
  drop = ("wall_time_s", "steps_per_s")
  assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}


def test_save_killed_mid_write_leaves_the_previous_checkpoint_and_resumes_from_it(teacher_run, tmp_path,
                                                                                  monkeypatch):
  """Orbax writes a step into a temporary folder and renames it when complete (kdlab.train.checkpoint)."""
  save = ocp.StandardCheckpointHandler.async_save
  saves = []

  async def write_state_then_die(self, directory, *args, **kwargs):
    futures = await save(self, directory, *args, **kwargs)
    saves.append(int(pathlib.Path(directory).parent.name.split(".")[0]))
    if len(saves) == 2:  # The second checkpoint: its state's files are written, then the process dies.
      for future in futures or []:
        future.result()
      raise KeyboardInterrupt
    return futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", write_state_then_die)
  config = load(f"{HINTON}:teacher,{QUICK}")
  workdir = tmp_path / "teacher"
  with pytest.raises(KeyboardInterrupt):
    train(config, workdir, use_wandb=False, progress=False)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", save)
  first, second = saves
  ckpts = workdir / "checkpoints"
  written = [p for p in ckpts.rglob("*") if p.is_file() and p.relative_to(ckpts).parts[0].startswith(f"{second}")]
  assert len(written) >= 3 and not (workdir / "summary.json").exists()  # Killed part-way through the save.
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [first]
  ckpt = checkpoint.Checkpointer(ckpts)
  assert ckpt.latest_step() == first
  ckpt.close()

  steps = count_train_steps(monkeypatch)
  resumed = train(config, workdir, use_wandb=False, progress=False)
  jax.effects_barrier()
  full = json.loads((teacher_run / "teacher" / "summary.json").read_text())
  assert sorted(steps) == list(range(first, full["steps"]))  # Only the steps after the intact checkpoint.
  drop = ("wall_time_s", "steps_per_s")
  assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
  assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(teacher_run / "teacher" / "metrics.jsonl")


BAD_INPUTS = [
    (["--config.data.batch_sise=3"], "unknown config field config.data.batch_sise"),
    (["--config.model.name=resnet999"], "config.model.name: unknown model 'resnet999'"),
    (["--config.objective[0].loss=kl"], "config.objective[0]: unknown loss 'kl'"),
    (["--config.objective[1].temperature=0"], "config.objective[1] (kd): temperature must be > 0"),
    (["--config.objective[1].temperature=-2.5"], "temperature must be > 0, got -2.5"),
    (["--config.teachers[0].init=/nonexistent/checkpoints"], "config.teachers[0].init: no teacher checkpoint"),
    (["--config.data.source=mnist6k"], "data.source: unknown source 'mnist6k'"),
    (["--config.data.prefetch_threads=-1"], "config.data.prefetch_threads=-1: use a whole number >= 0"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_input_is_one_line_error_and_leaves_workdir_untouched(runs, capsys, overrides, message):
  workdir = runs / "kd"
  before = tree_snapshot(workdir)
  teacher = f"--config.teachers[0].init={runs / 'teacher' / 'checkpoints'}"
  args = ["train", f"--config={HINTON}:kd,{QUICK}", f"--workdir={workdir}", "--nowandb", "--no-progress", teacher]
  code = cli.main(args + overrides)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("kdlab: error: ") and message in err[0], err
  assert tree_snapshot(workdir) == before


def test_other_config_in_existing_workdir_is_refused(runs, capsys):
  before = tree_snapshot(runs / "kd")
  code = cli.main(["train", f"--config={HINTON}:kd,{QUICK}", f"--workdir={runs / 'kd'}", "--nowandb",
                   f"--config.teachers[0].init={runs / 'teacher' / 'checkpoints'}", "--config.seed=9"])
  assert code == 2 and "holds a run with a different config" in capsys.readouterr().err
  assert tree_snapshot(runs / "kd") == before


def test_teacher_with_other_class_count_is_refused(runs, capsys):
  config = load(f"{HINTON}:kd,{QUICK}")
  apply_overrides(config, [f"--config.teachers[0].init={runs / 'teacher' / 'checkpoints'}",
                           "--config.model.num_classes=12"])
  from kdlab.errors import UserError
  with pytest.raises(UserError, match="teacher predicts 10 classes but the student 12"):
    train(config, runs / "other", use_wandb=False, progress=False)
  assert not (runs / "other").exists()


def test_prefetch_threads_change_speed_not_results(tmp_path):
  """config.data.prefetch_threads: grain threads prepare batches ahead; the batches are the same."""
  summaries = []
  for threads in (0, 3):
    config = load(f"{HINTON}:student,{QUICK}")
    config.data.prefetch_threads = threads
    summaries.append(train(config, tmp_path / f"t{threads}", use_wandb=False, progress=False))
  assert summaries[0]["test_errors"] == summaries[1]["test_errors"]
  losses = [[l["loss"] for l in map(json.loads, (tmp_path / f"t{t}" / "metrics.jsonl").read_text().splitlines())
             if "loss" in l] for t in (0, 3)]
  assert losses[0] == losses[1]
