"""Orbax checkpoints of the train state and the data iterator, and teacher loading.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. Orbax writes each step to
a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from kdlab.errors import UserError
from kdlab.train.state import TrainState, data_to_keys, keys_to_data


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator state)`` under ``directory``."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    tree = keys_to_data(dataclasses.asdict(state))
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                    data=ocp.args.JsonSave(data_state)))
    self.manager.wait_until_finished()

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores onto the shapes, dtypes and shardings of ``like`` (the freshly initialized state)."""
    step = self.latest_step() if step is None else step
    like_tree = dataclasses.asdict(like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, keys_to_data(like_tree))
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore()))
    state = TrainState(**data_to_keys(restored["state"], like_tree))
    return state, restored["data"]

  def close(self) -> None:
    self.manager.close()


def load_student_variables(directory: str | pathlib.Path, field: str) -> tuple[Any, Any]:
  """The student's ``(params, rest)`` pure dicts from the latest checkpoint of a finished run.

  ``directory`` is a run's ``checkpoints/`` folder; ``field`` names the config
  field it came from, for error messages.
  """
  path = pathlib.Path(directory).absolute()
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
  if not path.is_dir():
    raise UserError(f"{field}: no checkpoint directory at {str(directory)!r}; train that model first "
                    f"or point {field} at a run's checkpoints/ folder")
  if not steps:
    raise UserError(f"{field}: {str(directory)!r} holds no finished checkpoint")
  restored = ocp.StandardCheckpointer().restore(path / str(steps[-1]) / "state")
  return restored["params"]["student"], restored["rest"].get("student", {})
