"""Orbax checkpoints of the train state and the data iterator, and teacher loading.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. Orbax writes each step to
a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact and never a half-written one. Each array is
written and read shard by shard (a device's slices, no whole copy on the host);
restoring into a state laid out on another mesh reshards it. Saves are
asynchronous: training goes on while one completes; the next save, ``wait`` and
``close`` wait for it. A checkpoint that does not load (a damaged file, a missing ``state/``)
is moved aside to ``checkpoints_corrupt/`` and the newest one that loads is used
(:meth:`Checkpointer.restore_newest`).

With several processes (docs/clusters.md) every process writes its own shards of each array, the
``data`` item holds every process's iterator position (``{"per_process": [...]}``, written once),
and the processes decide together which checkpoint loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdlab import distributed
from kdlab.errors import UserError
from kdlab.train.state import TrainState, data_to_keys, keys_to_data


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator state)`` under ``directory``."""

  _closed = False  # set by close()

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    with _absl_errors_only():  # A damaged step's missing metadata draws a warning here; restore_newest says more.
      self.manager = ocp.CheckpointManager(
          self.directory, item_names=("state", "data"),
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    """Starts saving ``state`` and this process's iterator position ``data_state`` as checkpoint ``step``."""
    if distributed.process_count() > 1:
      data_state = {"per_process": [json.loads(s) for s in distributed.gather(json.dumps(data_state), "data")]}
    tree = keys_to_data(dataclasses.asdict(state))
    with _absl_errors_only():  # Not orbax's "waiting for the previous save" warning: kdlab's stderr is its own lines.
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
    data = restored["data"]
    if isinstance(data, dict) and "per_process" in data:  # Saved by several processes: this one's position.
      positions = data["per_process"]
      data = positions[distributed.process_index()] if distributed.process_index() < len(positions) else positions[0]
    return state, data

  def restore_newest(self, like: TrainState, at_most: int | None = None,
                     warn: Callable[[str], None] | None = None) -> tuple[TrainState, dict[str, Any], int] | None:
    """:meth:`restore` of the newest checkpoint (at most step ``at_most``) that loads, and its step; None
    if there is none. Newer ones that fail to load are moved to ``<directory>_corrupt/<step>-<time>``
    (never deleted), each with a one-line ``warn`` (default: to stderr); if none loads, nothing is
    moved and a :class:`UserError` names them. A checkpoint that reads fine but holds a state of
    other shapes than ``like`` is not damaged: a ``UserError`` says so.
    """
    steps = sorted((s for s in self.manager.all_steps() if at_most is None or s <= at_most), reverse=True)
    failed: list[tuple[int, str]] = []
    _quiet_abandoned_reads()
    for step in steps:
      error = None
      try:
        with _absl_errors_only():  # A damaged step draws orbax warnings: the one line below says it all.
          state, data_state = self.restore(like, step)
      except Exception as e:  # Any damage shows as some error of orbax, tensorstore or json.
        self._check_same_tree(like, step)
        error = _first_line(_root_cause(e))
      # Several processes: a checkpoint loads only if it loads on every one (each reads its own shards).
      if not distributed.all_true(error is None, f"restore{step}"):
        failed.append((step, error or "it does not load on another process"))
        continue
      for bad, reason in failed:
        moved = self._move_aside(bad)
        (warn or _warn)(f"kdlab: warning: checkpoint {self.directory / str(bad)} does not load ({reason}); "
                        f"moved to {moved}; resuming from step {step}")
      return state, data_state, step
    if failed:
      raise UserError(f"{self.directory}: no checkpoint loads (" + "; ".join(f"step {s}: {r}" for s, r in failed)
                      + "); restore the folder from a copy, or move it away to train from the start")
    return None

  def _check_same_tree(self, like: TrainState, step: int) -> None:
    """Raises :class:`UserError` if checkpoint ``step``'s metadata reads and lists other arrays or shapes
    than ``like`` (a changed config, not a damaged file); returns if it matches or does not read."""
    try:
      saved = _shapes(_item_metadata(self.directory / str(step) / "state"))
    except Exception:  # Unreadable metadata: damage, reported by the caller.
      return
    expected = _shapes(keys_to_data(dataclasses.asdict(like)))
    if saved and saved != expected:  # (orbax reads unreadable metadata as None: no arrays)
      differ = sorted(set(saved.items()) ^ set(expected.items()))[0][0]
      raise UserError(f"{self.directory / str(step)}: holds a train state of other arrays than this config's "
                      f"(first difference at {'/'.join(differ)}); resume with the config that wrote it, or use "
                      f"a new workdir")

  def _move_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint ``step`` out of the manager's sight (next to ``directory``); returns where."""
    aside = self.directory.with_name(self.directory.name + "_corrupt")
    aside.mkdir(exist_ok=True)
    target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    while target.exists():  # Two moves of one step within a second.
      target = target.with_name(target.name + "+")
    if distributed.is_writer():
      (self.directory / str(step)).rename(target)
    distributed.barrier("move_aside")  # Everyone's manager sees the folder gone.
    with _absl_errors_only():
      self.manager.reload()
    return target

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager (a second call does nothing)."""
    if self._closed:
      return
    self._closed = True
    self.manager.wait_until_finished()
    self.manager.close()


def _warn(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception ``e`` was raised from (tensorstore's message, not orbax's wrapper)."""
  seen = {id(e)}
  while True:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None or id(inner) in seen:
      return e
    seen.add(id(inner))
    e = inner


def _quiet_abandoned_reads() -> None:
  """Drops what the other reads of a failed restore report when they end after it (one traceback each,
  hundreds of lines): errors of orbax's read coroutines that nothing awaits any more, and "Event loop
  is closed" from tensorstore callbacks into orbax's finished event loop. Every other unraisable
  error is reported as before. Installed once, by the first :meth:`Checkpointer.restore_newest`, for the
  rest of the process (abandoned reads end at unknown times)."""
  previous = sys.unraisablehook
  if getattr(previous, "_kdlab_quiet", False):
    return

  def hook(unraisable: Any) -> None:
    e, source = unraisable.exc_value, unraisable.object
    code = getattr(source, "cr_code", None)
    abandoned_read = code is not None and "orbax" in code.co_filename
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    if not (abandoned_read or closed_loop):
      previous(unraisable)

  hook._kdlab_quiet = True
  sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
  line = (str(e).strip().splitlines() or [""])[0]
  line = line if len(line) <= 160 else line[:157] + "..."
  return f"{type(e).__name__}: {line}" if line else type(e).__name__


@contextlib.contextmanager
def orbax_errors_silenced() -> Iterator[None]:
  """Within: orbax's own error logs (a traceback per failed background save) are dropped; the failure
  is raised to the caller of ``save`` / ``wait`` / ``close``, which reports it in one line."""
  _quiet_abandoned_reads()  # A failed save's other writes end later, into orbax's closed event loop.
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl.setLevel(level)


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(max(level, logging.ERROR))  # Never lower: within orbax_errors_silenced errors stay dropped.
  try:
    yield
  finally:
    absl.setLevel(level)


def _item_metadata(path: pathlib.Path) -> Any:
  with _absl_errors_only():  # orbax warns that a step's state/ has no _CHECKPOINT_METADATA: it never has.
    return ocp.StandardCheckpointer().metadata(path).item_metadata


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of a tree's arrays, paths as word tuples (orbax stores int keys as strings)."""
  return {tuple(re.findall(r"\w+", jax.tree_util.keystr(k))): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(v, "shape")}


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
  path = latest_state(directory, field)
  # Host numpy arrays whatever devices saved them: the saving process's devices (cpu:0) may not exist here.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _item_metadata(path))
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
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
  saved = _item_metadata(path)
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
