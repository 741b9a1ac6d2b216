"""``kdlab sweep --launcher=submitit-local``: the SLURM launcher's path (a submitit job array) run by
submitit's local executor, the real library: the same results as the local launcher; a run asking for
2 nodes trains as a 2-process run; a rerun skips finished runs whichever launcher trained them."""

from __future__ import annotations

import csv
import pathlib

import pytest

from kdlab import launch
from kdlab.errors import UserError

from conftest import HINTON, child_env, kdlab_cmd, run_child

STUDENT = f"{HINTON}:student,source=digits,quick"
SWEEP = """
def get_sweep():
  return {"name": "two", "seeds": [0], "grid": {"optimizer.learning_rate": [0.01, 0.003]}, "slurm": {"time_min": 10}}
"""
TIMING = ("wall_time_s", "steps_per_s")


def _rows(workdir: pathlib.Path) -> list[dict]:
  rows = list(csv.DictReader((workdir / "results.csv").open()))
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _sweep(sweep_file: pathlib.Path, workdir: pathlib.Path, *extra: str, devices: int = 1):
  return run_child(kdlab_cmd("sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}",
                             "--nowandb", "--config.train.num_steps=6", *extra), devices=devices)


def test_a_sweep_through_submitit_gives_the_local_launchers_results(tmp_path):
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(SWEEP)
  _sweep(sweep_file, tmp_path / "local")
  out = _sweep(sweep_file, tmp_path / "submitit", "--launcher=submitit-local").stdout
  assert _rows(tmp_path / "submitit") == _rows(tmp_path / "local") and len(_rows(tmp_path / "local")) == 2
  assert all(r["finished"] == "True" for r in _rows(tmp_path / "local"))
  assert "submitted 2 runs as a job array" in out, out
  assert any((tmp_path / "submitit" / "submitit").rglob("*_log.out"))  # submitit's own job logs.
  (tmp_path / "local" / "results.csv").unlink()  # A rerun through submitit of a locally trained sweep:
  out = _sweep(sweep_file, tmp_path / "local", "--launcher=submitit-local").stdout
  assert "2 finished earlier" in out and "submitted" not in out, out
  assert len(_rows(tmp_path / "local")) == 2


def test_a_run_asking_for_two_nodes_trains_as_two_processes(tmp_path):
  """--slurm_nodes=2 on the local executor: two processes of 4 devices each join as one run."""
  sweep_file = tmp_path / "one.py"
  sweep_file.write_text(SWEEP.replace("[0.01, 0.003]", "[0.01]"))
  _sweep(sweep_file, tmp_path / "one", devices=8)
  _sweep(sweep_file, tmp_path / "two", "--launcher=submitit-local", "--slurm_nodes=2", devices=4)
  assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
  logs = "".join(p.read_text() for p in (tmp_path / "two" / "submitit").rglob("*_log.out"))
  assert "is connected to 7 peer ranks" in logs  # The two tasks' 8 devices are one run's collectives.


def test_resources_from_the_sweep_file_and_flags_are_checked():
  assert launch.resources({"nodes": 2, "time_min": 30}, {"time_min": 90, "partition": None}) == launch.Resources(
      nodes=2, time_min=90)
  with pytest.raises(UserError, match=r"'slurm': unknown field 'gpus'; use nodes, gpus_per_node"):
    launch.resources({"gpus": 8}, {})
  with pytest.raises(UserError, match=r"--slurm_nodes \(or the sweep's slurm\['nodes'\]\)=0: use a whole number >= 1"):
    launch.resources(None, {"nodes": 0})
