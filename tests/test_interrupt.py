"""SIGINT and SIGTERM through ``kdlab`` in a child process (docs/reliability.md, "Interruption").

A signal stops the run at the end of the step in flight, with a checkpoint there (after any save in
flight), one line on stderr and exit status 130 / 143; a second SIGINT exits at once and leaves the
previous checkpoint the latest. The child (``tests/fault_child.py``) slows steps and orbax's commits
so that a signal can be sent inside a chosen window, and records what it did in a marks file.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import HINTON, ROOT, checkpoint_contents, child_env, read_jsonl

STUDENT = f"--config={HINTON}:student,source=digits,quick"
ARGS = ["--nowandb", "--no-progress", "--config.train.num_epochs=3"]  # 107 steps, checkpoints every 9
SELF = str(ROOT / "configs" / "self_distill_mnist.py")


class Child:
  """``kdlab ARGS`` in a child process with the faults of ``tests/fault_child.py`` (``env``)."""

  def __init__(self, tmp_path: pathlib.Path, args: list[str], **env: str):
    self.marks = tmp_path / f"marks-{time.monotonic_ns()}"
    self.marks.touch()
    self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_child.py"), *args],
                                 env={**child_env(), "KDLAB_MARKS": str(self.marks), **env}, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def events(self, name: str) -> list[tuple[float, str]]:
    """``(time, argument)`` of each mark ``name``."""
    out = []
    for line in self.marks.read_text().splitlines():
      t, _, rest = line.partition(" ")
      event, _, arg = rest.partition(" ")
      if event == name:
        out.append((float(t), arg))
    return out

  def wait_for(self, name: str, count: int = 1, arg: str | None = None, timeout: float = 120) -> float:
    """Waits until ``count`` marks ``name`` (with ``arg``, if given) are written; returns the last one's time."""
    end = time.time() + timeout
    while time.time() < end:
      found = [t for t, a in self.events(name) if arg is None or a == arg]
      if len(found) >= count:
        return found[count - 1]
      if self.proc.poll() is not None:
        pytest.fail(f"the child exited ({self.proc.returncode}) before {count} x {name}: {self.proc.stderr.read()}")
      time.sleep(0.02)
    self.proc.kill()
    pytest.fail(f"no {count} x {name} within {timeout} s")

  def send(self, signum: int) -> float:
    self.proc.send_signal(signum)
    return time.time()

  def finish(self, timeout: float = 120) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the lines of stderr."""
    out, err = self.proc.communicate(timeout=timeout)
    return self.proc.returncode, out, err.strip().splitlines()


def _saved_step(line: str, signame: str, checkpoints: str) -> int:
  m = re.fullmatch(rf"kdlab: interrupted \({signame}\) at step (\d+); saved {re.escape(checkpoints)}/(\d+); "
                   r"rerun the same command to resume", line)
  assert m and m[1] == m[2], line
  return int(m[1])


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_sigterm_saves_every_vmapped_seed_at_the_step_in_flight_and_the_same_command_resumes_there(tmp_path):
  """Two vmapped seeds (one step trains both): they stop together, each with its checkpoint of the step."""
  from kdlab.train.checkpoint import Checkpointer
  workdir = tmp_path / "run"
  args = ["train", STUDENT, f"--workdir={workdir}", *ARGS, "--config.vmap_seeds=2"]
  child = Child(tmp_path, args, KDLAB_STEP_SLEEP="0.02")
  child.wait_for("step", 12)  # Past the first checkpoint (step 9).
  child.send(signal.SIGTERM)
  code, _, err = child.finish()
  assert code == 143 and len(err) == 1, err
  step = _saved_step(err[0], "SIGTERM", f"{workdir}/{{seed0,seed1}}/checkpoints")
  assert len(child.events("step")) == step > 9  # The step in flight was finished and saved; no other began.
  seeds = [workdir / "seed0", workdir / "seed1"]
  for seed in seeds:
    ckpt = Checkpointer(seed / "checkpoints")
    assert ckpt.latest_step() == step
    ckpt.close()
    assert [l for l in read_jsonl(seed / "metrics.jsonl") if "loss" in l][-1]["step"] == step
  assert not (workdir / "summary.json").exists()

  again = Child(tmp_path, args)
  code, out, err = again.finish()
  assert code == 0 and err == [], err
  assert [a for _, a in again.events("restored")] == [str(step)] * 2
  for seed in seeds:
    summary = json.loads((seed / "summary.json").read_text())
    segments = json.loads((seed / "segments.json").read_text())["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, step), (step, summary["steps"])]
    assert summary["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in segments))
    assert summary["wall_time_s"] > segments[1]["wall_time_s"]
  assert len(again.events("step")) == summary["steps"] - step  # Only the steps after the saved one.
  assert (workdir / "summary.json").exists()


def test_sigint_during_a_save_waits_for_it_then_saves_the_step_in_flight(tmp_path):
  """The issue's exit 139: Ctrl-C while orbax writes a checkpoint in its background thread. Sent at
  growing delays into step 9's save until one lands inside it (its commits are slowed to 0.4 s each)."""
  for attempt, delay in enumerate((0.1, 0.5, 0.9)):
    workdir = tmp_path / f"run{attempt}"
    child = Child(tmp_path, ["train", STUDENT, f"--workdir={workdir}", *ARGS], KDLAB_STEP_SLEEP="0.02",
                  KDLAB_COMMIT_SLEEP="0.4")
    first = child.wait_for("commit-start")
    time.sleep(max(0.0, first + delay - time.time()))
    sent = child.send(signal.SIGINT)
    code, _, err = child.finish()
    saved_9 = [t for t, a in child.events("commit-end") if a == "9"]
    if saved_9 and first < sent < saved_9[0]:
      break
  else:
    pytest.fail("no SIGINT arrived during step 9's save")
  assert code == 130 and len(err) == 1, err
  step = _saved_step(err[0], "SIGINT", str(workdir / "checkpoints"))
  assert step > 9 and [a for _, a in child.events("commit-end")][-1] == str(step)
  assert [p.name for p in sorted((workdir / "checkpoints").iterdir())] == sorted(["9", str(step)])  # No temporary.
  arrays, _ = checkpoint_contents(workdir / "checkpoints", step)
  assert arrays[("step",)] == step


def test_second_sigint_exits_at_once_and_leaves_the_previous_checkpoint_latest(tmp_path):
  from kdlab.train.checkpoint import Checkpointer
  workdir = tmp_path / "run"
  child = Child(tmp_path, ["train", STUDENT, f"--workdir={workdir}", *ARGS], KDLAB_STEP_SLEEP="0.02",
                KDLAB_COMMIT_SLEEP="0.4")
  child.wait_for("commit-start", arg="data")  # Step 9's save is being written.
  child.send(signal.SIGINT)
  child.wait_for("commit-start", 2, arg="data")  # The save of the step in flight has begun.
  sent = child.send(signal.SIGINT)
  code, _, err = child.finish()
  assert time.time() - sent < 5  # At once: not after the save.
  assert code == 130 and err == ["kdlab: interrupted again (SIGINT); exiting now without the checkpoint being "
                                 "written; the previous checkpoint is intact; rerun the same command to resume"]
  assert _steps(workdir / "checkpoints") == [9]
  assert any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())  # The abandoned save.
  ckpt = Checkpointer(workdir / "checkpoints")
  assert ckpt.latest_step() == 9
  ckpt.close()
  arrays, _ = checkpoint_contents(workdir / "checkpoints", 9)
  assert arrays[("step",)] == 9


def test_born_again_chain_stops_within_its_generation(tmp_path):
  workdir = tmp_path / "chain"
  child = Child(tmp_path, ["train", f"--config={SELF}:ban,source=digits,quick,generations=1",
                           f"--workdir={workdir}", *ARGS], KDLAB_STEP_SLEEP="0.02")
  child.wait_for("step", 12)
  child.send(signal.SIGTERM)
  code, _, err = child.finish()
  assert code == 143 and len(err) == 1, err
  step = _saved_step(err[0], "SIGTERM", str(workdir / "gen0" / "checkpoints"))
  assert _steps(workdir / "gen0" / "checkpoints")[-1] == step
  assert not (workdir / "gen1").exists() and not (workdir / "summary.json").exists()  # The chain went no further.


def test_signal_during_start_up_stops_at_once_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  child = Child(tmp_path, ["train", STUDENT, f"--workdir={workdir}", *ARGS], KDLAB_START_SLEEP="60")
  child.wait_for("prepare")
  sent = child.send(signal.SIGTERM)
  code, _, err = child.finish()
  assert time.time() - sent < 10
  assert code == 143 and err == ["kdlab: interrupted (SIGTERM); rerun the same command to resume"], err
  assert not workdir.exists()


SWEEP = """
def get_sweep():
  return {"name": "two", "grid": {"optimizer.learning_rate": [0.01, 0.003]}}
"""


def test_interrupted_sweep_saves_its_run_and_starts_no_other(tmp_path):
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(SWEEP)
  workdir = tmp_path / "sweep"
  child = Child(tmp_path, ["sweep", STUDENT, f"--sweep={sweep_file}", f"--workdir={workdir}", "--nowandb",
                           "--config.train.num_epochs=3"], KDLAB_STEP_SLEEP="0.02")
  child.wait_for("step", 12)
  child.send(signal.SIGINT)
  code, _, err = child.finish()
  first, second = workdir / "optimizer.learning_rate=0.01" / "seed=0", workdir / "optimizer.learning_rate=0.003"
  assert code == 130 and len(err) == 1, err
  step = _saved_step(err[0], "SIGINT", str(first / "checkpoints"))
  assert _steps(first / "checkpoints")[-1] == step and not second.exists()
