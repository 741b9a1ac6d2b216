"""``kdlab train`` as 2 processes x 4 simulated CPU devices on 127.0.0.1, against 1 process x 8 devices.

Each process of a multi-process run reads only its rows of every batch, process 0 alone writes the
run's files, checkpoints are written by all together; a process lost makes the other stop with one
line within ``--distributed_timeout``; killing both and restarting both resumes.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import HINTON, ROOT, child_env, kdlab_cmd, random_gpt_run, read_jsonl, run_child, tree_snapshot

LM = str(ROOT / "configs" / "lm_pysrc.py")
TIMEOUT_S = 15  # --distributed_timeout of these runs
# Dropout and jitter on: the processes' shares of the random views and masks must be the whole batch's.
CLASSIFY = [f"--config={HINTON}:teacher,source=digits,quick", "--config.data.augment=jitter",
            "--config.train.num_epochs=2.0", "--config.train.checkpoint_every_epochs=0.5"]
MESH = ["--config.mesh=[('data', 2), ('fsdp', 2), ('model', 2)]"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], workdir: pathlib.Path, processes: int = 2, env: dict | None = None,
           only: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
  """``kdlab train ARGS`` as ``processes`` processes of 8 / processes devices each, joined on a free port
  (``only[i]``: more arguments for process ``i`` alone)."""
  port = _port()
  procs = []
  for i in range(processes):
    flags = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                                       f"--process_id={i}", f"--distributed_timeout={TIMEOUT_S}"]
    flags += (only or {}).get(i, [])
    procs.append(subprocess.Popen(kdlab_cmd("train", *args, f"--workdir={workdir}", "--no-progress", *flags),
                                  env={**child_env(8 // processes), **(env or {})}, cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"a process did not finish within {timeout} s")
    out.append((p.returncode, err))
  return out


def _train(args: list[str], workdir: pathlib.Path, processes: int, env: dict | None = None) -> None:
  for rc, err in _finish(_start(args, workdir, processes, env)):
    assert rc == 0, err[-3000:]


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  return [(m["step"], m["loss"]) for m in read_jsonl(workdir / "metrics.jsonl") if "loss" in m]


def _comparable(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k not in ("wall_time_s", "steps_per_s")}


def _assert_same_run(got: pathlib.Path, want: pathlib.Path) -> None:
  """Same per-step losses (float32 sums in another order: 1e-5), the same summary, one copy of each file."""
  a, b = _losses(got), _losses(want)
  assert [s for s, _ in a] == [s for s, _ in b]  # One writer: every line once.
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=2e-5, atol=1e-6)
  sa, sb = (_comparable(json.loads((w / "summary.json").read_text())) for w in (got, want))
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_allclose(np.asarray(sa[k], float), np.asarray(sb[k], float), rtol=2e-5, atol=1e-6, err_msg=k)
  files = lambda w: sorted(p.name for p in w.iterdir() if p.name not in ("wandb", "wandb_id"))  # noqa: E731
  assert files(got) == files(want)
  assert (got / "config.json").read_text() == (want / "config.json").read_text()


def _restored_params(workdir: pathlib.Path) -> dict:
  """The student's parameters of ``workdir``'s last checkpoint, restored by one process of one device."""
  code = ("import json, sys, jax, numpy as np, ml_collections\n"
          "from kdlab.train import checkpoint, optim\n"
          "from kdlab.train.prepare import prepare\n"
          "from kdlab.train.state import create_state\n"
          "w = sys.argv[1]\n"
          "c = ml_collections.ConfigDict(json.load(open(w + '/config.json')))\n"
          "c.mesh = [('data', 1)]\n"
          "s = prepare(c)\n"
          "tx = optim.make(c.optimizer, s.steps_per_epoch, s.total_steps)\n"
          "_, st = create_state(s.make_learner, tx, s.objective.init_state(), c.seed, ema=s.ema_decay is not None,\n"
          "                     mesh=s.mesh, param_shardings=s.param_shardings)\n"
          "st, _ = checkpoint.Checkpointer(w + '/checkpoints').restore(st)\n"
          "flat = jax.tree_util.tree_flatten_with_path(st.params)[0]\n"
          "np.savez(w + '.npz', **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})\n")
  run_child([sys.executable, "-c", code, str(workdir)], devices=1)
  return dict(np.load(f"{workdir}.npz"))


@pytest.fixture(scope="module")
def classified(tmp_path_factory) -> pathlib.Path:
  """The classification run trained by 1 process x 8 devices (``one``) and 2 x 4 (``two``)."""
  root = tmp_path_factory.mktemp("classify")
  _train(CLASSIFY + MESH, root / "one", processes=1)
  _train(CLASSIFY + MESH, root / "two", processes=2)
  return root


@pytest.mark.parametrize("kind", ["classification", "lm"])
def test_two_processes_train_as_one_process_of_eight_devices(tmp_path, kind, classified):
  if kind == "classification":
    tmp_path = classified
  else:
    teacher = random_gpt_run(tmp_path / "teacher")
    args = [f"--config={LM}:kd,quick,teacher={teacher}", "--config.data.batch_size=8"] + MESH
    _train(args, tmp_path / "one", processes=1)
    _train(args, tmp_path / "two", processes=2, env={"WANDB_MODE": "offline"})
  _assert_same_run(tmp_path / "two", tmp_path / "one")
  one, two = _restored_params(tmp_path / "one"), _restored_params(tmp_path / "two")
  assert one.keys() == two.keys()
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
  if kind == "lm":  # W&B (offline files): one run, written by process 0.
    runs = list((tmp_path / "two" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs


def test_kill_9_of_both_processes_then_restart_resumes_to_the_same_result(tmp_path, classified):
  killed = tmp_path / "killed"
  procs = _start(CLASSIFY + MESH, killed, processes=2)
  deadline = time.time() + 180
  while time.time() < deadline and not (killed / "checkpoints" / "36").exists():  # Past the first epoch.
    time.sleep(0.1)
  for p in procs:
    p.kill()
  _finish(procs)
  assert not (killed / "summary.json").exists()
  _train(CLASSIFY + MESH, killed, processes=2)
  _assert_same_run(killed, classified / "two")


def test_kill_9_of_one_process_stops_the_other_within_the_timeout_with_one_line(tmp_path):
  for victim in (1, 0):  # A worker, then the coordinator.
    workdir = tmp_path / f"victim{victim}"
    procs = _start(CLASSIFY + ["--config.train.num_epochs=50.0"], workdir, processes=2)
    deadline = time.time() + 180
    while time.time() < deadline and not (workdir / "checkpoints" / "18").exists():
      time.sleep(0.1)
    procs[victim].kill()
    killed_at = time.time()
    (rc, err), = _finish([procs[1 - victim]], timeout=TIMEOUT_S + 60)
    took = time.time() - killed_at
    _finish([procs[victim]])
    lines = [l for l in err.splitlines() if l.startswith("kdlab: error:")]
    assert rc != 0 and took < TIMEOUT_S + 30, (rc, took)
    assert len(lines) == 1 and "distributed:" in lines[0] and "resume" in lines[0], err[-2000:]
    assert "Traceback" not in err and "Check failure stack trace" not in err, err[-2000:]
    assert f"process {1 - victim}" in lines[0]


@pytest.mark.parametrize("bad_on", [(0, 1), (1,)])
def test_bad_input_on_two_processes_is_the_same_line_on_both_and_writes_nothing(tmp_path, bad_on):
  """A bad field on both processes, or on process 1 alone (process 0 must not start writing, nor hang)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("mine")
  before = tree_snapshot(workdir)
  results = _finish(_start(CLASSIFY, workdir, processes=2, only={i: ["--config.data.batch_size=-4"] for i in bad_on}),
                    timeout=TIMEOUT_S + 90)
  assert [rc for rc, _ in results] == [2, 2], results
  lines = [[l for l in err.splitlines() if l.startswith("kdlab: error:")] for _, err in results]
  assert len(lines[0]) == 1 and lines[0] == lines[1] and "config.data.batch_size" in lines[0][0], results
  assert tree_snapshot(workdir) == before
