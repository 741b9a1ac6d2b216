"""End to end on the embedded 8x8 digits: teacher -> distilled student, outputs, CLI errors."""

import json
import pathlib

import numpy as np
import pytest

from kdlab import cli
from kdlab.config import apply_overrides, load
from kdlab.data import load as load_source
from kdlab.train.evaluate import evaluate_run
from kdlab.train.loop import train

from conftest import HINTON, tree_snapshot

QUICK = "source=digits,quick"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  teacher = load(f"{HINTON}:teacher,{QUICK}")
  train(teacher, root / "teacher", use_wandb=False, progress=False)
  kd = load(f"{HINTON}:kd,{QUICK}")
  kd.teachers[0]["init"] = str(root / "teacher" / "checkpoints")
  train(kd, root / "kd", use_wandb=False, progress=False)
  return root


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


def test_finished_run_restarts_without_training(runs, capsys):
  before = tree_snapshot(runs / "teacher")
  config = load(f"{HINTON}:teacher,{QUICK}")
  summary = train(config, runs / "teacher", use_wandb=False, progress=False)
  assert summary["test_errors"] == json.loads((runs / "teacher" / "summary.json").read_text())["test_errors"]
  assert set(tree_snapshot(runs / "teacher")) >= set(before)


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


def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = load(f"{HINTON}:student,{QUICK}")
  config.train.num_steps = 5
  train(config, tmp_path / "run", use_wandb=True, progress=False)
  offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
  assert len(offline) == 1 and any(offline[0].glob("*.wandb"))


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
