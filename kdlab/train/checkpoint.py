"""Orbax checkpoints of the train state and the data iterator, and teacher loading.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. Orbax writes each step to
a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact and never a half-written one. Each array is
written and read shard by shard (a device's slices, no whole copy on the host);
restoring into a state laid out on another mesh reshards it. Saves are
asynchronous: training goes on while one completes; the next save, ``wait`` and
``close`` wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from kdlab.errors import UserError
from kdlab.train.state import TrainState, data_to_keys, keys_to_data


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator state)`` under ``directory``."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    tree = keys_to_data(dataclasses.asdict(state))
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                    data=ocp.args.JsonSave(data_state)))

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk."""
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
    """Waits for the save in flight, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def latest_state(directory: str | pathlib.Path, field: str, step: int | None = None) -> pathlib.Path:
  """The ``state`` folder of the latest checkpoint (or of ``step``) in a run's ``checkpoints/`` folder
  ``directory``."""
  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise UserError(f"{field}: no checkpoint directory at {str(directory)!r}; train that model first "
                    f"or point {field} at a run's checkpoints/ folder")
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
  if not steps:
    raise UserError(f"{field}: {str(directory)!r} holds no finished checkpoint")
  if step is not None and step not in steps:
    raise UserError(f"--step={step}: {str(directory)!r} holds no checkpoint of step {step}; it has steps "
                    f"{', '.join(map(str, steps))}")
  return path / str(steps[-1] if step is None else step) / "state"


def load_student_variables(directory: str | pathlib.Path, field: str) -> tuple[Any, Any]:
  """The student's ``(params, rest)`` pure dicts (host arrays) from the latest checkpoint of a finished run.

  ``directory`` is a run's ``checkpoints/`` folder; ``field`` names the config
  field it came from, for error messages.
  """
  restored = ocp.StandardCheckpointer().restore(latest_state(directory, field))
  return restored["params"]["student"], restored["rest"].get("student", {})


def restore_student(directory: str | pathlib.Path, params_like: Any, rest_like: Any, field: str,
                    step: int | None = None) -> tuple[Any, Any]:
  """The student's ``(params, rest)`` of a finished run, read straight into the layout of the ``*_like``
  pure dicts (``jax.ShapeDtypeStruct`` with shardings, or arrays): each device reads its own slices,
  cast to the target dtype; no full copy is made on the host. PRNG-key leaves of ``rest_like``
  (which must be arrays) are kept as they are. A structure or shape that differs from the
  checkpoint's is a ``UserError``. ``step``: that checkpoint instead of the latest.
  """
  path = latest_state(directory, field, step)
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # orbax warns that a step's state/ has no _CHECKPOINT_METADATA: it never has.
  try:
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
  finally:
    absl.setLevel(level)
  try:
    target = {"params": {"student": _target(params_like, saved["params"]["student"], True)},
              "rest": {"student": _target(rest_like, saved.get("rest", {}).get("student", {}), False)}}
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{field}: the checkpoint in {str(directory)!r} does not match the model ({e}); "
                    f"check the teacher's config.model (architecture and sizes)") from None
  if not target["rest"]["student"]:  # Nothing to read there (orbax stores an empty dict as a leaf).
    del target["rest"]
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return (_like_structure(params_like, restored["params"]["student"]),
          _like_structure(rest_like, restored.get("rest", {}).get("student", {})))


def _is_key(x: Any) -> bool:
  return jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)


def _target(like: Any, saved: Any, strict: bool) -> Any:
  """``like``'s leaves as restore targets, keyed as the saved tree is (orbax stores int keys as strings)."""
  if isinstance(like, dict):
    if not isinstance(saved, dict):
      raise ValueError("structure differs")
    out = {}
    for k, v in like.items():
      key = k if k in saved else str(k)
      if key not in saved:
        if strict:
          raise KeyError(f"{k!r} missing")
        continue
      sub = _target(v, saved[key], strict)
      if sub is not None:
        out[key] = sub
    return out
  if _is_key(like):
    return None
  if tuple(saved.shape) != tuple(like.shape):
    if strict:
      raise ValueError(f"shape {tuple(saved.shape)} saved, {tuple(like.shape)} expected")
    return None
  return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=like.sharding)


def _like_structure(like: Any, restored: Any) -> Any:
  """``restored`` (saved keys) in ``like``'s structure; entries not restored keep ``like``'s value."""
  if isinstance(like, dict):
    restored = restored if isinstance(restored, dict) else {}
    return {k: _like_structure(v, restored.get(k, restored.get(str(k)))) for k, v in like.items()}
  return like if restored is None else restored
