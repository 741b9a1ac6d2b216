"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step) and Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
import pathlib
from typing import Any, Mapping


class MetricsLog:
  """Appends ``{"step": n, ...}`` lines to ``WORKDIR/metrics.jsonl``.

  On resume from step ``s``, lines logged after ``s`` (by the killed run) are
  dropped so the file matches an uninterrupted run.
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    if self.path.exists():
      kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """All lines of a run's ``metrics.jsonl``."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


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
