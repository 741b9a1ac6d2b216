"""W&B logging: offline by default, the same metrics as ``metrics.jsonl``, one run id across restarts.

One short run, interrupted after its first checkpoint and restarted, with ``WANDB_MODE`` unset; its
offline ``.wandb`` files are read back record by record (wandb 0.31 ships no Python reader of them).
"""

import json
import pathlib
import struct

import pytest

from kdlab import sweep as ksweep
from kdlab.config import load
from kdlab.train import logging as klog
from kdlab.train.loop import train

from conftest import HINTON, read_jsonl

STEPS, KILLED_AT = 20, 18  # digits, quick: a checkpoint every 9 steps, train logs every 10, evals every 18.
SWEEP = """
def get_sweep():
  return {"name": "wb", "seeds": [1], "list": [{"objective[0].weight": 0.5}]}
"""


class Killed(Exception):
  """Stands for the process being killed mid-run."""


def wandb_records(path: pathlib.Path) -> list:
  """The protobuf ``Record``s of a ``.wandb`` file (W&B's LevelDB-log format: 32 KiB blocks of chunks)."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = path.read_bytes()
  assert data[:7] == b":W&B\xe1\xbe\x00"  # Ident, magic 0xBEE1, version 0.
  records, pos, chunks = [], 7, b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # A block's tail too short for a chunk header is padding.
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    chunks += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # A full record, or the last chunk of one.
      record = pb.Record()
      record.ParseFromString(chunks)
      records.append(record)
      chunks = b""
  return records


def offline_run(run_dir: pathlib.Path) -> dict:
  """The run record and the history (step -> logged values) of an ``offline-run-*`` directory."""
  records = wandb_records(next(run_dir.glob("run-*.wandb")))
  history = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(r.history.step.num, {}).update(items)
  run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  return {"run": run, "history": history}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """A sweep's run trained with W&B on and ``WANDB_MODE`` unset, killed at step 18, then restarted."""
  root = tmp_path_factory.mktemp("wandb")
  (root / "sweep.py").write_text(SWEEP)
  sweep, _ = ksweep.plan(f"{HINTON}:student,source=digits,quick", str(root / "sweep.py"))
  run, = sweep.runs()
  base = load(f"{HINTON}:student,source=digits,quick")
  base.train.num_steps = STEPS
  config = ksweep.run_config(base, sweep, run)
  workdir = root / "run"
  write = klog.MetricsLog.write

  def write_until_killed(self, step, metrics):
    if step >= KILLED_AT:
      raise Killed(step)
    write(self, step, metrics)

  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("WANDB_MODE", raising=False)  # conftest (or make) sets it; the default is what is tested.
    mp.setenv("WANDB_SILENT", "true")
    mp.setattr(klog.MetricsLog, "write", write_until_killed)
    with pytest.raises(Killed):
      train(config, workdir, progress=False)
    import wandb
    wandb.finish(exit_code=1)  # What the killed process's W&B service does when its client dies.
    first_id = (workdir / "wandb_id").read_text() if (workdir / "wandb_id").exists() else None
    mp.setattr(klog.MetricsLog, "write", write)
    summary = train(config, workdir, progress=False)
  runs = sorted((workdir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime_ns)
  return dict(workdir=workdir, sweep=sweep, run=run, summary=summary, first_id=first_id,
              offline=[offline_run(r) for r in runs], dirs=runs)


def test_wandb_is_offline_by_default_under_the_workdir(interrupted):
  assert len(interrupted["dirs"]) == 2  # One offline run per start; nothing went online.
  for d in interrupted["dirs"]:
    assert d.parent == interrupted["workdir"] / "wandb" and d.name.startswith("offline-run-")


def test_wandb_history_holds_the_metrics_of_metrics_jsonl(interrupted):
  """Per step, the merged history of both starts (the restart's values win) equals metrics.jsonl."""
  history = {}
  for part in interrupted["offline"]:
    for step, values in part["history"].items():
      history.setdefault(step, {}).update(values)
  expected = {}
  for line in read_jsonl(interrupted["workdir"] / "metrics.jsonl"):
    expected.setdefault(line.pop("step"), {}).update({k: v for k, v in line.items() if not isinstance(v, list)})
  logged = {step: {k: v for k, v in values.items() if not k.startswith(("_", "summary/"))}
            for step, values in history.items()}
  assert logged == expected
  assert {9, 10, KILLED_AT, STEPS} <= set(logged) and "test/accuracy" in logged[KILLED_AT]
  summary = {k: v for k, v in interrupted["summary"].items() if isinstance(v, (int, float))}
  assert {k.removeprefix("summary/"): v for k, v in history[STEPS].items() if k.startswith("summary/")} == summary


def test_wandb_restart_continues_the_same_run_id_after_the_checkpoint(interrupted):
  first, second = interrupted["offline"]
  run_id = (interrupted["workdir"] / "wandb_id").read_text()
  assert run_id == interrupted["first_id"] and first["run"].run_id == second["run"].run_id == run_id
  assert all(d.name.endswith(f"-{run_id}") for d in interrupted["dirs"])
  assert max(first["history"]) < KILLED_AT and min(second["history"]) == 10  # Resumed after step 9's checkpoint.


def test_wandb_run_gets_the_sweeps_group_and_tags(interrupted):
  run = interrupted["offline"][1]["run"]
  assert run.run_group == "wb" and run.project == "kdlab"
  assert list(run.tags) == ["objective[0].weight=0.5", "seed=1"]
  assert run.display_name == f"{interrupted['workdir'].parent.name}/run"
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config["objective"][0]["weight"] == 0.5 and config["seed"] == 1


@pytest.mark.parametrize("enabled, mode", [(False, None), (False, "offline"), (True, "disabled")])
def test_wandb_off_by_nowandb_or_wandb_mode_disabled_writes_nothing(tmp_path, monkeypatch, enabled, mode):
  if mode is None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
  else:
    monkeypatch.setenv("WANDB_MODE", mode)
  log = klog.WandbLog(tmp_path, {"seed": 0}, enabled=enabled, project="kdlab")
  log.write(1, {"loss": 1.0})
  log.close()
  assert log.run is None and not any(tmp_path.iterdir())
