"""Helpers for the paper reproductions in ``paper_repro/``: cached runs, stage times and mean +/- std tables."""

from __future__ import annotations

import json
import pathlib
import platform
import time
from typing import Any

import ml_collections

from kdlab.sweep import mean_std  # noqa: F401  (the reproductions' tables use it from here)
from kdlab.train.loop import train


def run_cached(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, quiet: bool = False) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` unless it already finished there; returns its summary.

  An interrupted run resumes from its checkpoint, so a whole reproduction can
  be restarted with the same command.
  """
  if (workdir / "summary.json").exists():
    return json.loads((workdir / "summary.json").read_text())
  t0 = time.time()
  summary = train(config, workdir, use_wandb=False, progress=False)
  if not quiet:
    print(f"  {workdir}: test accuracy {summary['test_accuracy']:.4f}, {summary['test_errors']} errors "
          f"({time.time() - t0:.0f} s)", flush=True)
  return summary


class StageTimes:
  """Seconds spent per stage, kept in ``ROOT/times.json`` so that a resumed reproduction reports the
  compute time of every stage, whichever invocation ran it."""

  def __init__(self, root: pathlib.Path):
    self.path = root / "times.json"
    self.values: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

  def add(self, stage: str, seconds: float) -> None:
    """Adds ``seconds`` to ``stage`` and writes the file."""
    self.values[stage] = self.values.get(stage, 0.0) + seconds
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.values, indent=2))

  def get(self, *stages: str) -> float:
    """The seconds of these stages together (0 for a stage not run)."""
    return sum(self.values.get(s, 0.0) for s in stages)


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``), for the machine line of results and benchmarks."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"
