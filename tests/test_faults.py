"""Damaged checkpoints, divergence and run files through ``kdlab train`` in a child process
(docs/reliability.md: "Corrupted checkpoints", "Divergence", "Run files")."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kdlab import cli
from kdlab.train.logging import read_metrics

from conftest import HINTON, ROOT, checkpoint_contents, child_env, read_jsonl, tree_snapshot

STUDENT = f"--config={HINTON}:student,source=digits,quick"  # 35 steps: log every 10, checkpoint every 9
MANY = ["--config.checkpoint.keep=6", "--config.train.checkpoint_every_epochs=0.125"]  # checkpoints every 4
FIX = ("--config.optimizer.learning_rate", "--config.optimizer.clip_grad_norm", "--config.train.max_loss")


def _train(workdir: pathlib.Path, *overrides: str, poison_after: int | None = None) -> subprocess.CompletedProcess:
  """``kdlab train`` of the digits student in a child (``tests/fault_child.py``: the parameters turn nan
  after step ``poison_after``)."""
  env = {**child_env(), **({} if poison_after is None else {"KDLAB_POISON_AFTER": str(poison_after)})}
  args = [sys.executable, str(ROOT / "tests" / "fault_child.py"), "train", STUDENT, f"--workdir={workdir}",
          "--nowandb", "--no-progress", *overrides]
  return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
  """A finished run that keeps its last 6 checkpoints."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  proc = _train(workdir, *MANY)
  assert proc.returncode == 0, proc.stderr
  return workdir


def _copy(finished: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  return workdir


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").glob("ocdbt.process_*/d/*")), key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir: pathlib.Path) -> None:
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:100])


def _garble_array_file(step_dir: pathlib.Path) -> None:
  path = _largest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  for i in range(100, len(data), 97):
    data[i] ^= 0x5A
  path.write_bytes(bytes(data))


def _garble_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "state" / "_METADATA").write_text("{garbage")


def _delete_state(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir / "state")


def _empty_step_folder(step_dir: pathlib.Path) -> None:
  for p in step_dir.iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()


DAMAGE = [_truncate_array_file, _garble_array_file, _garble_metadata, _delete_state, _empty_step_folder]


def test_damaged_checkpoints_are_moved_aside_and_the_newest_that_loads_resumes(finished, tmp_path):
  """Each kind of damage on one of the five newest checkpoints (newest first: a truncated array file,
  a garbled one, garbled metadata, a deleted state/, an empty step folder), and a torn last line of
  metrics.jsonl, as a crash leaves them: the run resumes from the sixth and ends as the undamaged one."""
  workdir = _copy(finished, tmp_path)
  (workdir / "summary.json").unlink()
  steps = _steps(workdir / "checkpoints")
  assert len(steps) == 6
  damaged = steps[:0:-1]
  for step, damage in zip(damaged, DAMAGE):
    damage(workdir / "checkpoints" / str(step))
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 35, "loss": 0.4')  # Torn: no end.
  assert read_metrics(workdir) == read_jsonl(finished / "metrics.jsonl")
  kept = {p: p.read_bytes() for p in (workdir / "checkpoints").rglob("*") if p.is_file()}

  proc = _train(workdir, *MANY)
  assert proc.returncode == 0, proc.stderr
  warnings = proc.stderr.strip().splitlines()
  assert len(warnings) == len(DAMAGE), warnings
  for step, line in zip(damaged, warnings):
    m = re.fullmatch(rf"kdlab: warning: checkpoint {re.escape(str(workdir))}/checkpoints/{step} does not load "
                     rf"\((\w+: .+)\); moved to ({re.escape(str(workdir))}/checkpoints_corrupt/{step}-\d{{8}}T\d{{6}}); "
                     rf"resuming from step {steps[0]}", line)
    assert m, line
    moved = pathlib.Path(m[2])
    for path, data in kept.items():  # Moved as it was, never deleted.
      if path.relative_to(workdir / "checkpoints").parts[0] == str(step):
        assert (moved / path.relative_to(workdir / "checkpoints" / str(step))).read_bytes() == data
  summary, expected = (json.loads((w / "summary.json").read_text()) for w in (workdir, finished))
  assert summary["test_errors"] == expected["test_errors"] and summary["steps"] == expected["steps"]
  assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(finished / "metrics.jsonl")  # Torn line gone.
  segments = json.loads((workdir / "segments.json").read_text())["segments"]
  assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 35), (steps[0], 35)]
  assert summary["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in segments))
  timed = sum(s["steps_timed"] for s in segments) / sum(s["time_in_steps"] for s in segments)
  assert summary["steps_per_s"] == pytest.approx(timed)


def test_no_checkpoint_that_loads_is_one_line_error_and_changes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  (workdir / "summary.json").unlink()
  steps = _steps(workdir / "checkpoints")
  for step in steps:
    _delete_state(workdir / "checkpoints" / str(step))
  before = tree_snapshot(workdir)
  proc = _train(workdir, *MANY)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr
  assert err[0].startswith(f"kdlab: error: {workdir / 'checkpoints'}: no checkpoint loads (step {steps[-1]}: ")
  assert all(f"step {s}: " in err[0] for s in steps)
  assert tree_snapshot(workdir) == before


def _all_finite(directory: pathlib.Path) -> bool:
  return all(np.all(np.isfinite(a)) for step in _steps(directory) for a in checkpoint_contents(directory, step)[0]
             .values() if np.issubdtype(a.dtype, np.floating))


def test_nan_stops_before_a_checkpoint_holds_it_and_a_lower_learning_rate_continues_the_workdir(tmp_path):
  """A nan loss (the parameters turned nan after step 19: step 20's loss is nan), then, resumed with a
  lower learning rate, a nan train state at a checkpoint step (27: its loss was computed before the
  update, so only the state check sees it). Neither is ever saved."""
  workdir = tmp_path / "run"
  proc = _train(workdir, poison_after=19)  # Checkpoints at 9 and 18 came before.
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(err) == 1, proc.stderr
  assert err[0].startswith(f"kdlab: error: {workdir}: the loss became nan (the mean over steps 19-20) at step 20; "
                           f"the last good checkpoint is {workdir / 'checkpoints' / '18'}; ")
  assert all(option in err[0] for option in FIX)
  assert _steps(workdir / "checkpoints") == [9, 18] and _all_finite(workdir / "checkpoints")
  assert [l["step"] for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l] == [9, 10, 18]
  assert not (workdir / "summary.json").exists()

  proc = _train(workdir, "--config.optimizer.learning_rate=0.005", poison_after=27)  # Resumable with this change.
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(err) == 1, proc.stderr
  assert err[0].startswith(f"kdlab: error: {workdir}: the train state (parameters or optimizer state) holds nan "
                           f"or inf at step 27; the last good checkpoint is {workdir / 'checkpoints' / '18'}; ")
  assert _steps(workdir / "checkpoints") == [9, 18] and _all_finite(workdir / "checkpoints")
  logged = [l for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]
  assert [l["step"] for l in logged] == [9, 10, 18, 20, 27]  # Resumed at 18 (the loss logs before the state check).
  assert all(np.isfinite(l["loss"]) for l in logged)
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 0.005


def test_max_loss_stops_an_exploding_run(tmp_path):
  """The issue's Adam at lr 1e6: its loss stays finite (about 1e20) and, unguarded, it runs to the end."""
  workdir = tmp_path / "run"
  proc = _train(workdir, "--config.optimizer.learning_rate=1e6", "--config.train.max_loss=100")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(err) == 1, proc.stderr
  m = re.fullmatch(rf"kdlab: error: {re.escape(str(workdir))}: the loss (\S+) passed config.train.max_loss=100 "
                   r"\(the mean over steps 1-9\) at step 9; no checkpoint was saved before it; rerun the same command "
                   r"with .*", err[0])
  assert m and float(m[1]) > 100, err[0]
  assert _steps(workdir / "checkpoints") == []


@pytest.mark.parametrize("value", ["-1", "0", "'high'", "1e999"])
def test_bad_max_loss_is_one_line_error(tmp_path, capsys, value):
  code = cli.main(["train", STUDENT, f"--workdir={tmp_path / 'run'}", "--nowandb", "--no-progress",
                   f"--config.train.max_loss={value}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("kdlab: error: config.train.max_loss="), err
  assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
  """A 300 KiB tmpfs at ``tmp_path/disk`` (needs root's mount; skipped where it is refused)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
  yield disk
  subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(small_disk, tmp_path):
  """The issue's 475 lines: checkpoint 18 does not fit (its arrays are written in orbax's background
  thread); one line, exit 1; with the disk grown, the same command resumes from 9 to the uninterrupted
  run's numbers."""
  full = _train(small_disk / "run")
  assert full.returncode == 1, full.stderr[-3000:]
  lines = full.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("kdlab: error: no space left on the device writing "), full.stderr
  assert _steps(small_disk / "run" / "checkpoints") == [9]
  subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
  resumed = _train(small_disk / "run")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _train(tmp_path / "whole").returncode == 0
  assert [(m["step"], m.get("loss")) for m in read_metrics(small_disk / "run")] == [
      (m["step"], m.get("loss")) for m in read_metrics(tmp_path / "whole")]
