"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step), ``segments.json`` (wall time over
every process that trained the run) and Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
import pathlib
import time
from typing import Any, Mapping

from kdlab.errors import UserError
from kdlab.files import write_json


class MetricsLog:
  """Appends ``{"step": n, ...}`` lines to ``WORKDIR/metrics.jsonl``.

  On resume from step ``s``, lines logged after ``s`` (by the killed run) are dropped so the file
  matches an uninterrupted run; so is a torn last line (a crash or a full disk mid-write). The
  lines kept stay byte for byte; the file is replaced in one rename. ``enabled=False`` (a process
  of a multi-process run other than process 0) writes nothing.
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int, *, enabled: bool = True):
    self.path = workdir / "metrics.jsonl"
    self.enabled = enabled
    if enabled and self.path.exists():
      kept = "".join(text + "\n" for text, line in _lines(self.path) if line["step"] <= resume_step)
      tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
      tmp.write_text(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """All lines of a run's ``metrics.jsonl`` (a torn last line left out)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [line for _, line in _lines(path)] if path.exists() else []


def _lines(path: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
  """``(text, parsed)`` per non-empty line of a JSON-lines file; a last line that does not parse is one
  a crash cut short and is left out; any other is damage, a :class:`UserError`."""
  numbered = [(n, t) for n, t in enumerate(path.read_text(errors="replace").splitlines(), 1) if t.strip()]
  out = []
  for i, (number, text) in enumerate(numbered):
    try:
      line = json.loads(text)
      if not isinstance(line, dict) or not isinstance(line.get("step"), int):
        raise ValueError("not an object with an integer step")
    except ValueError as e:
      if i == len(numbered) - 1:
        break
      raise UserError(f"{path}: line {number} is not a metrics line ({e}); the file was edited or damaged: "
                      f"restore it or delete the line") from None
    out.append((text, line))
  return out


class Segments:
  """Wall time and speed over every process that trained a run, in ``WORKDIR/segments.json``.

  Each process that trains the run (the first, then each resume) is one segment: ``from_step``,
  ``to_step`` (the last step it saved), ``wall_time_s`` (start-up included), ``steps_timed`` and
  ``time_in_steps`` (its steps after the first, which compiles). :meth:`update` rewrites the file
  atomically, so a killed run keeps the time of the segments before it, up to its last save.
  Only process 0 of a multi-process run writes it (``enabled``); every process reads it.
  """

  def __init__(self, workdir: pathlib.Path, start_step: int, started: float, *, enabled: bool = True):
    self.path = workdir / "segments.json"
    self.enabled = enabled
    self.earlier: list[dict[str, Any]] = []
    if self.path.exists():
      try:
        self.earlier = list(json.loads(self.path.read_text())["segments"])
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{self.path}: not a segments file ({e}); delete it (only the wall time of the "
                        f"earlier runs of this workdir is lost from summary.json)") from None
    self.started = started
    self.current = {"from_step": start_step, "to_step": start_step, "wall_time_s": 0.0, "steps_timed": 0,
                    "time_in_steps": 0.0}

  def update(self, step: int, steps_timed: int, time_in_steps: float) -> None:
    """Records this segment up to ``step`` and writes the file."""
    self.current.update(to_step=step, wall_time_s=time.time() - self.started, steps_timed=steps_timed,
                        time_in_steps=time_in_steps)
    if self.enabled:
      write_json(self.path, {"segments": [*self.earlier, self.current]})

  def totals(self) -> dict[str, Any]:
    """``wall_time_s`` and ``steps_per_s`` (None before any timed step) over every segment so far."""
    every = [*self.earlier, self.current]
    timed, seconds = sum(s["steps_timed"] for s in every), sum(s["time_in_steps"] for s in every)
    return {"wall_time_s": sum(s["wall_time_s"] for s in every), "steps_per_s": timed / seconds if seconds else None}


class WandbLog:
  """W&B logging, offline unless ``WANDB_MODE`` says otherwise; a no-op when disabled."""

  def __init__(self, workdir: pathlib.Path, config: Mapping[str, Any], *, enabled: bool, project: str,
               group: str | None = None, tags: tuple[str, ...] = ()):
    self.run = None
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
      return
    import wandb  # Lazy: importing wandb costs about a second.
    id_file = workdir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    self.run = wandb.init(project=project, dir=str(workdir), config=dict(config), id=run_id, resume="allow",
                          mode=os.environ.get("WANDB_MODE", "offline"), group=group, tags=list(tags),
                          name="/".join(workdir.parts[-2:]), settings=wandb.Settings(silent=True, console="off"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self.run is not None:
      self.run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=step)

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
