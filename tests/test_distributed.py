"""Runs in child processes: kill -9 and resume; 1 vs 8 simulated devices; multi-device errors."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np

from conftest import HINTON, child_env, kdlab_cmd, read_jsonl, run_child, tree_snapshot

QUICK = "source=digits,quick"


def _train_args(workdir, *extra):
  # The teacher variant has dropout; quick turns its jitter off on digits, so it is switched back on here.
  return kdlab_cmd("train", f"--config={HINTON}:teacher,{QUICK}", f"--workdir={workdir}", "--nowandb",
                   "--config.train.num_epochs=6.0", "--config.train.checkpoint_every_epochs=0.5",
                   "--config.data.augment=jitter", *extra)


def _comparable(summary):
  return {k: v for k, v in summary.items() if k not in ("wall_time_s", "steps_per_s")}


def _finished_steps(ckpts):
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_sigkill_mid_run_then_resume_runs_only_the_remaining_steps_to_the_same_result(tmp_path):
  """Dropout and jitter: resuming must restore the RNG state and the data iterator."""
  run_child(_train_args(tmp_path / "full", "--no-progress"))
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_args(killed, "--no-progress"), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    proc.send_signal(signal.SIGSTOP)  # Looked at while stopped: kill it once it logged past a checkpoint.
    steps = _finished_steps(killed / "checkpoints")
    logged = read_jsonl(killed / "metrics.jsonl") if (killed / "metrics.jsonl").exists() else []
    if steps and any(l["step"] > steps[-1] and "loss" in l for l in logged):
      proc.send_signal(signal.SIGKILL)
      break
    proc.send_signal(signal.SIGCONT)
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists(), "not killed mid-run"
  last = _finished_steps(killed / "checkpoints")[-1]
  assert 0 < last < 210
  lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
  kept = [l for l in lines if json.loads(l)["step"] <= last]
  assert len(kept) < len(lines)  # The killed process logged steps after its last checkpoint.

  resumed_proc = run_child(_train_args(killed))  # With the progress bar: it starts at the restored step.
  starts = re.findall(r"(\d+)/210\b", resumed_proc.stderr)
  assert starts and int(starts[0]) == last, resumed_proc.stderr[-2000:]
  full = json.loads((tmp_path / "full" / "summary.json").read_text())
  resumed = json.loads((killed / "summary.json").read_text())
  assert _comparable(resumed) == _comparable(full)
  assert (killed / "metrics.jsonl").read_text().startswith("".join(kept))
  full_log, resumed_log = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
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
