"""Runs in child processes: kill -9 and resume; 1 vs 8 simulated devices; multi-device errors."""

import json
import os
import signal
import subprocess
import time

import numpy as np

from conftest import HINTON, child_env, kdlab_cmd, read_jsonl, run_child, tree_snapshot

QUICK = "source=digits,quick"


def _train_args(workdir, *extra):
  return kdlab_cmd("train", f"--config={HINTON}:teacher,{QUICK}", f"--workdir={workdir}", "--nowandb",
                   "--no-progress", "--config.train.num_epochs=6.0", "--config.train.checkpoint_every_epochs=0.5",
                   *extra)


def _comparable(summary):
  return {k: v for k, v in summary.items() if k not in ("wall_time_s", "steps_per_s")}


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  """The teacher variant has dropout and jitter: resuming must restore RNG state and the data iterator."""
  run_child(_train_args(tmp_path / "full"))
  proc = subprocess.Popen(_train_args(tmp_path / "killed"), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 120
  while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 210
  run_child(_train_args(tmp_path / "killed"))
  full = json.loads((tmp_path / "full" / "summary.json").read_text())
  resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert _comparable(resumed) == _comparable(full)
  full_log, resumed_log = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "killed" / "metrics.jsonl")
  assert [l["step"] for l in resumed_log] == [l["step"] for l in full_log]
  np.testing.assert_allclose([l.get("loss", 0.0) for l in resumed_log], [l.get("loss", 0.0) for l in full_log],
                             rtol=1e-6)


def _losses(workdir):
  return [(l["step"], l["loss"]) for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
  args = ["--config.train.num_epochs=1.0", "--config.train.log_every_steps=5"]
  run_child(kdlab_cmd("train", f"--config={HINTON}:teacher,{QUICK}", f"--workdir={tmp_path / 'one'}", "--nowandb",
                      "--no-progress", *args), devices=1)
  run_child(kdlab_cmd("train", f"--config={HINTON}:teacher,{QUICK}", f"--workdir={tmp_path / 'eight'}",
                      "--nowandb", "--no-progress", *args), devices=8)
  one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  assert [s for s, _ in one] == [s for s, _ in eight] and len(one) >= 5
  np.testing.assert_allclose([l for _, l in eight], [l for _, l in one], rtol=2e-5)
  s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
  s8 = json.loads((tmp_path / "eight" / "summary.json").read_text())
  np.testing.assert_allclose(s8["test_ce"], s1["test_ce"], rtol=1e-4)


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("results")
  before = tree_snapshot(workdir)
  proc = run_child(kdlab_cmd("train", f"--config={HINTON}:teacher,{QUICK}", f"--workdir={workdir}", "--nowandb",
                             "--config.data.batch_size=36"), devices=8, check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2
  assert lines[-1].startswith("kdlab: error: config.data.batch_size=36 is not divisible by the data-parallel size 8")
  assert tree_snapshot(workdir) == before
