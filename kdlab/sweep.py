"""Sweeps: one config run over a grid, a list or random samples of overrides, times seeds.

  kdlab sweep --config=configs/hinton_mnist.py:kd --sweep=experiments/temperature_alpha.py \\
      --workdir=runs/temperature_alpha [--parallel N] [--nowandb] [--config.FIELD=VALUE ...]

A sweep file defines ``get_sweep()`` returning a dict (docs/sweeps.md has examples);
``--sweep=FILE:ARG`` calls ``get_sweep(ARG)`` instead, for variants (e.g. a tiny smoke test):

  seeds   [0, 1, 2]                                  each run sets config.seed (default [0])
  grid    {path: [values], (path, path): [(v, w), ...]}   cartesian product; a tuple key ties paths
  list    [{path: value, ...}, ...]                  one setting per entry
  random  {"num_samples": n, "seed": s,
           "space": {path: ("uniform" | "loguniform", lo, hi) | [choices]}}
  name    W&B group and report title (default: the file's stem)
  labels  {path: "short name"} for table columns and plot axes

At most one of grid / list / random (none: one setting, the config as is). A run
is a setting plus a seed, trained in ``DIR/<setting>/seed=<seed>`` where
``<setting>`` spells its overrides (``objective.1.temperature=4,objective.0.weight=0.9``).
Everything is validated before any run starts. Finished runs (``summary.json``)
are skipped and interrupted ones resume from their checkpoints, so rerunning
the same command finishes an interrupted sweep. At the end ``DIR/results.csv``
(one row per run) and ``DIR/results.md`` (one row per setting, mean +/- std over
seeds) are written; ``kdlab report DIR`` rewrites them and adds plots.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from kdlab import files
from kdlab import config as kconfig
from kdlab.errors import UserError
from kdlab.train.ranges import MAX_SEED

SWEEP_KEYS = ("name", "seeds", "grid", "list", "random", "labels", "slurm")
DISTRIBUTIONS = ("uniform", "loguniform")
# summary.json fields in the order results.csv lists them; unknown fields follow, sorted.
SUMMARY_FIELDS = ("steps", "test_accuracy", "best_test_accuracy", "test_errors", "test_examples", "test_ce",
                  "agreement_top1", "kl_teacher", "wall_time_s", "steps_per_s", "test_errors_per_class")
# The same for language-model runs (kdlab.train.tasks.LanguageModel's summary).
LM_SUMMARY_FIELDS = ("steps", "val_loss", "best_val_loss", "val_ppl", "best_val_ppl", "val_accuracy", "kl_teacher",
                     "agreement_top1", "teacher_val_loss", "val_tokens", "wall_time_s", "steps_per_s")
_MAX_NAME = 200  # Characters of a setting's directory name; longer names get a hash suffix.


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of the sweep: overrides applied to the base config (any seed)."""
  name: str                                   # its directory under the sweep's workdir
  overrides: tuple[tuple[str, Any], ...]      # (canonical path, value) in sweep order
  entries: tuple[str, ...]                    # where each override comes from, for messages
  values: dict[str, Any]                      # every swept path's resolved value in this setting


@dataclasses.dataclass(frozen=True)
class Run:
  setting: Setting
  seed: int

  @property
  def name(self) -> str:
    return f"{self.setting.name}/seed={self.seed}"


@dataclasses.dataclass
class Sweep:
  """A validated sweep: its settings (with resolved values), seeds and how to display them."""
  name: str
  kind: str                                   # grid | list | random | seeds
  axes: list[tuple[str, ...]]                 # swept keys in order; tied paths form one axis
  axis_values: list[list[Any]]                # grid only: each axis' values (tuples for tied axes)
  settings: list[Setting]
  seeds: list[int]
  labels: dict[str, str]
  command: dict[str, Any]                     # config, sweep file, base overrides

  @property
  def paths(self) -> list[str]:
    return [p for axis in self.axes for p in axis]

  def runs(self) -> list[Run]:
    """Seed-major, so a sweep stopped early has one seed of every setting first."""
    return [Run(s, seed) for seed in self.seeds for s in self.settings]

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "axes": [list(a) for a in self.axes],
            "axis_values": self.axis_values, "seeds": self.seeds, "labels": self.labels,
            "command": self.command,
            "settings": [{"name": s.name, "overrides": [list(o) for o in s.overrides], "values": s.values}
                         for s in self.settings]}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Sweep:
    settings = [Setting(s["name"], tuple((p, v) for p, v in s["overrides"]), (), s["values"])
                for s in data["settings"]]
    return cls(data["name"], data["kind"], [tuple(a) for a in data["axes"]], data["axis_values"], settings,
               data["seeds"], data["labels"], data["command"])

  def axis_label(self, axis: Sequence[str]) -> str:
    return " / ".join(self.labels.get(p, p) for p in self.shown(axis))

  def shown(self, axis: Sequence[str]) -> list[str]:
    """A tied axis is shown by its labeled paths (all of them when none is labeled)."""
    labeled = [p for p in axis if p in self.labels]
    return labeled or list(axis)

  def tick(self, axis: Sequence[str], setting: Setting) -> str:
    return "/".join(format_value(setting.values[p]) for p in self.shown(axis))


# ----------------------------------------------------------------------------------------------
# Paths and values.

def canonical(path: str) -> str:
  """``"objective[1].temperature"`` spelled one way (raises UserError if it does not parse)."""
  return _join(kconfig.parse_path(path))


def _join(parts: Sequence[str | int]) -> str:
  return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _overlap(a: str, b: str) -> bool:
  """True when setting ``a`` and ``b`` conflict: the same field, or one inside the other."""
  pa, pb = kconfig.parse_path(a), kconfig.parse_path(b)
  n = min(len(pa), len(pb))
  return pa[:n] == pb[:n]


def format_value(value: Any) -> str:
  """Short, exact text of a swept value: 4.0 -> "4", 0.1 -> "0.1", (800, 800) -> "(800, 800)"."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
  if isinstance(value, (list, tuple)):
    return "(" + ", ".join(format_value(v) for v in value) + ")"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
  return str(value)


def _slug(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "x".join(_slug(v) for v in value) or "empty"
  if isinstance(value, dict):
    return "+".join(f"{k}-{_slug(v)}" for k, v in value.items()) or "empty"
  return re.sub(r"[^A-Za-z0-9._+-]", "_", format_value(value))


def setting_name(overrides: Sequence[tuple[str, Any]]) -> str:
  """A readable, filesystem- and shell-safe directory name: ``objective.1.temperature=4,seed...``."""
  if not overrides:
    return "default"
  name = ",".join(f"{_join(kconfig.parse_path(p)).replace('[', '.').replace(']', '')}={_slug(v)}"
                  for p, v in overrides)
  if len(name) > _MAX_NAME:
    name = name[:_MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def _get(config: Any, path: str) -> Any:
  node = config
  for key in kconfig.parse_path(path):
    node = node[key]
  if isinstance(node, ml_collections.ConfigDict):
    return node.to_dict()
  return list(node) if isinstance(node, tuple) else node


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------
# Reading and validating a sweep file.

def load_sweep_file(spec: str) -> dict[str, Any]:
  """``"experiments/NAME.py[:ARG]"`` -> that file's ``get_sweep()`` (``get_sweep(ARG)`` with an ARG)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f"--sweep: no sweep file {path!r}; pass e.g. --sweep=experiments/temperature_alpha.py")
  module = kconfig.load_python_file(file, "kdlab_sweep", "--sweep")
  if not callable(getattr(module, "get_sweep", None)):
    raise UserError(f"--sweep={spec}: defines no get_sweep(); add one returning the sweep dict (docs/sweeps.md)")
  try:
    sweep = module.get_sweep(arg) if arg else module.get_sweep()
  except UserError:
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"--sweep={spec}: get_sweep({arg!r}): {kconfig.one_line(str(e))}") from None
  except Exception as e:  # noqa: BLE001  (a bug in the sweep file: name it, no traceback)
    raise UserError(f"--sweep={spec}: get_sweep({arg!r}) failed with {kconfig.python_error(e, file)}; "
                    f"fix {path}") from None
  if not isinstance(sweep, dict):
    raise UserError(f"--sweep={spec}: get_sweep() must return a dict, got {type(sweep).__name__}")
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  if unknown:
    raise UserError(f"--sweep={spec}: unknown key(s) {', '.join(map(repr, unknown))}; "
                    f"allowed: {', '.join(SWEEP_KEYS)}")
  return sweep


def _key_paths(key: Any, entry: str, where: str) -> tuple[str, ...]:
  """A grid/space key (a path or a tuple of tied paths) -> canonical paths, checked for overlaps."""
  raw = key if isinstance(key, tuple) else (key,)
  if not raw or not all(isinstance(p, str) for p in raw):
    raise UserError(f"{where}: {entry}: a key is a config path or a tuple of paths")
  paths = []
  for p in raw:
    try:
      paths.append(canonical(p))
    except UserError:
      raise UserError(f"{where}: {entry}: cannot parse the path {p!r} (use a.b[0].c)") from None
  for a, b in itertools.combinations(paths, 2):
    if _overlap(a, b):
      raise UserError(f"{where}: {entry}: conflicting overrides, {a} and {b} set the same field")
  return tuple(paths)


def _entry(section: str, key: Any) -> str:
  return f"{section}[{key!r}]" if not isinstance(key, tuple) else f"{section}[({', '.join(map(repr, key))})]"


def _grid(grid: Any, where: str) -> tuple[list[tuple[str, ...]], list[list[Any]], list[str], list[list[tuple]]]:
  if not isinstance(grid, dict) or not grid:
    raise UserError(f"{where}: grid is empty; give at least one {{path: [values]}} entry")
  axes, axis_values, entries, choices = [], [], [], []
  for key, values in grid.items():
    entry = _entry("grid", key)
    paths = _key_paths(key, entry, where)
    if not isinstance(values, (list, tuple)) or not values:
      raise UserError(f"{where}: {entry}: no values; give a non-empty list")
    rows = []
    for i, v in enumerate(values):
      if len(paths) > 1:
        if not isinstance(v, (list, tuple)) or len(v) != len(paths):
          raise UserError(f"{where}: {entry}[{i}]: expected a tuple of {len(paths)} values (one per path), got {v!r}")
        rows.append(tuple(v))
      else:
        rows.append((v,))
    if len(set(map(repr, rows))) != len(rows):
      raise UserError(f"{where}: {entry}: a value appears twice")
    axes.append(paths)
    axis_values.append([list(r) if len(paths) > 1 else r[0] for r in rows])
    entries.append(entry)
    choices.append(rows)
  return axes, axis_values, entries, choices


def _settings_from_spec(spec: dict[str, Any], where: str):
  """-> kind, axes, axis_values, [(overrides, entries)] without touching any config."""
  kinds = [k for k in ("grid", "list", "random") if k in spec]
  if len(kinds) > 1:
    raise UserError(f"{where}: give one of grid, list or random, not {' and '.join(kinds)}")
  kind = kinds[0] if kinds else "seeds"
  points: list[tuple[list[tuple[str, Any]], list[str]]] = []
  axes: list[tuple[str, ...]] = []
  axis_values: list[list[Any]] = []

  if kind == "grid":
    axes, axis_values, entries, choices = _grid(spec["grid"], where)
    for a, b in itertools.combinations(range(len(axes)), 2):
      for p in axes[a]:
        for q in axes[b]:
          if _overlap(p, q):
            raise UserError(f"{where}: {entries[b]}: conflicting overrides, {q} is also set by {entries[a]}")
    for combo in itertools.product(*choices):
      overrides, sources = [], []
      for paths, row, entry in zip(axes, combo, entries):
        overrides += list(zip(paths, row))
        sources += [entry] * len(paths)
      points.append((overrides, sources))

  elif kind == "list":
    entries_list = spec["list"]
    if not isinstance(entries_list, (list, tuple)) or not entries_list:
      raise UserError(f"{where}: list is empty; give at least one {{path: value}} entry")
    seen: list[str] = []
    for i, item in enumerate(entries_list):
      if not isinstance(item, dict):
        raise UserError(f"{where}: list[{i}]: each entry is a {{path: value}} dict, got {type(item).__name__}")
      overrides, sources = [], []
      for key, value in item.items():
        entry = _entry(f"list[{i}]", key)
        paths = _key_paths(key, entry, where)
        if len(paths) > 1 and (not isinstance(value, (list, tuple)) or len(value) != len(paths)):
          raise UserError(f"{where}: {entry}: expected a tuple of {len(paths)} values (one per path), got {value!r}")
        values = tuple(value) if len(paths) > 1 else (value,)
        for p, v in zip(paths, values):
          for q, _ in overrides:
            if _overlap(p, q):
              raise UserError(f"{where}: {entry}: conflicting overrides, {p} is set twice in list[{i}] "
                              f"(also as {q})")
          overrides.append((p, v))
          sources.append(entry)
          if p not in seen:
            seen.append(p)
      points.append((overrides, sources))
    axes = [(p,) for p in seen]

  elif kind == "random":
    rnd = spec["random"]
    if not isinstance(rnd, dict) or set(rnd) - {"num_samples", "seed", "space"}:
      raise UserError(f"{where}: random must be {{'num_samples': n, 'seed': s, 'space': {{...}}}}")
    n = rnd.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise UserError(f"{where}: random['num_samples']: must be an int >= 1, got {n!r}")
    space = rnd.get("space")
    if not isinstance(space, dict) or not space:
      raise UserError(f"{where}: random['space'] is empty; give at least one {{path: distribution}} entry")
    samplers = []
    for key, dist in space.items():
      entry = _entry("random.space", key)
      paths = _key_paths(key, entry, where)
      for axis, prev in zip(axes, samplers):
        for p in paths:
          if any(_overlap(p, q) for q in axis):
            raise UserError(f"{where}: {entry}: conflicting overrides, {p} is also set by {prev[0]}")
      samplers.append((entry, paths, _sampler(dist, paths, entry, where)))
      axes.append(paths)
    seed = rnd.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
      raise UserError(f"{where}: random['seed']: must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    seen_points = set()
    for _ in range(n):
      overrides, sources = [], []
      for entry, paths, sample in samplers:
        overrides += list(zip(paths, sample(rng)))
        sources += [entry] * len(paths)
      if repr(overrides) not in seen_points:  # Repeated draws of the same choices are one setting.
        seen_points.add(repr(overrides))
        points.append((overrides, sources))
  else:
    points.append(([], []))
  return kind, axes, axis_values, points


def _sampler(dist: Any, paths: tuple[str, ...], entry: str, where: str):
  if isinstance(dist, list):
    if not dist:
      raise UserError(f"{where}: {entry}: no choices; give a non-empty list")
    if len(paths) > 1 and not all(isinstance(c, (list, tuple)) for c in dist):
      raise UserError(f"{where}: {entry}: each choice is a tuple of {len(paths)} values (one per path)")
    rows = [tuple(c) if len(paths) > 1 else (c,) for c in dist]
    if any(len(r) != len(paths) for r in rows):
      raise UserError(f"{where}: {entry}: each choice is a tuple of {len(paths)} values (one per path)")
    return lambda rng: rows[int(rng.integers(len(rows)))]
  if (isinstance(dist, tuple) and len(dist) == 3 and dist[0] in DISTRIBUTIONS and len(paths) == 1
      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in dist[1:])):
    name, lo, hi = dist
    if not lo < hi or (name == "loguniform" and lo <= 0):
      raise UserError(f"{where}: {entry}: need lo < hi{' and lo > 0' if name == 'loguniform' else ''}, got {dist!r}")
    # Four significant digits keep run names short and exactly equal to the value used.
    if name == "uniform":
      return lambda rng: (float(f"{rng.uniform(lo, hi):.4g}"),)
    return lambda rng: (float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}"),)
  raise UserError(f"{where}: {entry}: expected ('uniform'|'loguniform', lo, hi) for one path or a list of "
                  f"choices, got {dist!r}")


def _seeds(spec: dict[str, Any], where: str) -> list[int]:
  seeds = spec.get("seeds", [0])
  if (not isinstance(seeds, (list, tuple)) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
    raise UserError(f"{where}: seeds must be a non-empty list of ints, got {seeds!r}")
  if len(set(seeds)) != len(seeds):
    raise UserError(f"{where}: seeds: a seed appears twice in {list(seeds)}")
  if not all(0 <= s <= MAX_SEED for s in seeds):
    raise UserError(f"{where}: seeds {list(seeds)}: each must be in [0, {MAX_SEED}]; use e.g. [0, 1, 2]")
  return list(seeds)


def _override_paths(base_overrides: Sequence[str]) -> list[str]:
  paths = []
  for arg in base_overrides:
    if arg.startswith("--config.") and "=" in arg:
      paths.append(canonical(arg.removeprefix("--config.").partition("=")[0]))
  return paths


def _detail(e: UserError) -> str:
  """The message of a config override error without its ``--config.PATH=VALUE:`` prefix."""
  msg = str(e)
  return msg.split(": ", 1)[1] if msg.startswith("--config.") and ": " in msg else msg


def plan(config_spec: str, sweep_file: str,
         base_overrides: Sequence[str] = ()) -> tuple[Sweep, ml_collections.ConfigDict]:
  """Loads a sweep and checks its structure; returns it with the base config. Writes nothing.

  Every override of every setting is applied to a copy of the config, so an
  unknown path, a badly typed value or a conflict names its entry. :func:`check`
  then builds each setting as ``train`` would.
  """
  base = kconfig.apply_overrides(kconfig.load(config_spec), base_overrides)
  where = f"--sweep={sweep_file}"
  spec = load_sweep_file(sweep_file)
  seeds = _seeds(spec, where)
  kind, axes, axis_values, points = _settings_from_spec(spec, where)
  name = spec.get("name", pathlib.Path(sweep_file.partition(":")[0]).stem)
  if not isinstance(name, str) or not name:
    raise UserError(f"{where}: name must be a non-empty string")
  labels = spec.get("labels", {})
  if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
    raise UserError(f"{where}: labels must be a {{path: 'short name'}} dict of strings")
  labels = {canonical(k): v for k, v in labels.items()}

  fixed = _override_paths(base_overrides)
  for p in fixed:
    if _overlap(p, "seed"):
      raise UserError(f"--config.{p}: conflicting overrides, the sweep sets config.seed from its seeds "
                      f"{seeds}; set seeds in {sweep_file} instead")
  for overrides, sources in points:
    for (p, _), entry in zip(overrides, sources):
      if _overlap(p, "seed"):
        raise UserError(f"{where}: {entry}: conflicting overrides, config.seed is set by seeds; "
                        f"list the seeds under 'seeds' instead")
      for q in fixed:
        if _overlap(p, q):
          raise UserError(f"{where}: {entry}: conflicting overrides, {p} is also set on the command line "
                          f"by --config.{q}=...; drop one of them")

  configs = []
  for overrides, sources in points:
    config = copy.deepcopy(base)
    for (p, v), entry in zip(overrides, sources):
      try:
        kconfig.override(config, p, v)
      except UserError as e:
        raise UserError(f"{where}: {entry}: {p}={v!r}: {_detail(e)}") from None
    configs.append(config)
  swept = [p for axis in axes for p in axis]
  settings, names = [], {}
  for (overrides, sources), config in zip(points, configs):
    setting = Setting(setting_name(overrides), tuple(overrides), tuple(sources),
                      {p: _jsonable(_get(config, p)) for p in swept})
    if setting.name in names:
      raise UserError(f"{where}: {sources[0] if sources else 'seeds'}: two settings get the same directory "
                      f"name {setting.name!r} ({names[setting.name]!r} and {list(overrides)!r})")
    names[setting.name] = list(overrides)
    settings.append(setting)

  command = {"config": config_spec, "sweep": sweep_file, "overrides": list(base_overrides)}
  sweep = Sweep(name, kind, axes, _jsonable(axis_values), settings, seeds, labels, command)
  return sweep, base


def check(sweep: Sweep, base: ml_collections.ConfigDict) -> None:
  """Builds every setting's config abstractly (models, objective, data, teacher checkpoints) as ``train``
  would, so a bad setting stops the sweep before any run starts."""
  from kdlab.train import loop  # Lazy: imports JAX.
  from kdlab.train import teachers as teacherlib
  from kdlab.train.prepare import eval_metric_names, prepare
  for setting in sweep.settings:
    config = run_config(base, sweep, Run(setting, sweep.seeds[0]))
    try:
      setup = prepare(config)
      if (config.get("checkpoint") or {}).get("best_metric") is not None:  # Needs the teachers' eval metrics.
        teachers, teacher_vars = teacherlib.load_teachers(setup.teacher_specs, setup.mesh,
                                                          config.get("sharding_rules") or ())
        loop.best_checkpoint_metric(config, eval_metric_names(setup, teachers, teacher_vars))
    except UserError as e:
      raise UserError(f"--sweep={sweep.command['sweep']}: setting {setting.name}: {e}") from None


def run_config(base: ml_collections.ConfigDict, sweep: Sweep, run: Run) -> ml_collections.ConfigDict:
  """The config ``run`` trains with: the base config, the setting's overrides, its seed, W&B group and tags."""
  config = copy.deepcopy(base)
  for path, value in run.setting.overrides:
    kconfig.override(config, path, value)
  config.seed = run.seed
  config.wandb_group = sweep.name
  # W&B caps a tag at 64 characters.
  config.wandb_tags = [f"{sweep.labels.get(p, p)}={format_value(v)}"[:64] for p, v in run.setting.overrides] + [
      f"seed={run.seed}"]
  return config


def _check_existing(workdir: pathlib.Path, sweep: Sweep, base: ml_collections.ConfigDict) -> None:
  """A run directory already holding another config would be skipped (or refused by train): stop now."""
  for run in sweep.runs():
    existing = workdir / run.name / "config.json"
    if existing.exists():
      wanted = json.loads(run_config(base, sweep, run).to_json(sort_keys=True))
      if json.loads(existing.read_text()) != wanted:
        raise UserError(f"--workdir={workdir}: {run.name} holds a run with a different config (the sweep file, "
                        f"its name or the --config overrides changed); use a new --workdir or delete that run")


# ----------------------------------------------------------------------------------------------
# Running.

def read_summary(workdir: pathlib.Path, run: Run) -> dict[str, Any] | None:
  """The run's ``summary.json``, or None if it has none (or a partial one, from a kill mid-write)."""
  try:
    return json.loads((workdir / run.name / "summary.json").read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def finished(workdir: pathlib.Path, run: Run) -> bool:
  return read_summary(workdir, run) is not None


class _Lock:
  """An exclusive lock on one run, so two processes never train it at once (released if killed)."""

  def __init__(self, workdir: pathlib.Path, run: Run):
    locks = workdir / ".locks"
    locks.mkdir(exist_ok=True)
    self.file = (locks / (run.name.replace("/", "__") + ".lock")).open("w")

  def acquire(self) -> bool:
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except OSError:
      self.file.close()
      return False

  def release(self) -> None:
    self.file.close()


def run_sweep(config_spec: str, sweep_file: str, workdir: str | pathlib.Path, base_overrides: Sequence[str] = (),
              *, parallel: int = 1, use_wandb: bool = True, worker: bool = False, launcher: str = "local",
              slurm: dict[str, Any] | None = None, timeout_s: float | None = None) -> list[str]:
  """Validates, then trains every unfinished run; returns the names of runs that failed.

  Runs go in order, each under a lock, so any number of processes can share a
  sweep: one skips the runs another holds. ``parallel`` > 1 starts that many
  worker processes (``python -m kdlab sweep ... --worker``) that do exactly this;
  a worker skips validation (its parent did it), printing and aggregation.
  ``launcher="slurm"`` (or ``"submitit-local"``) submits the unfinished runs as one
  job array instead (:mod:`kdlab.launch`; ``slurm``: the ``--slurm_*`` flags given,
  over the sweep file's ``slurm`` entry; ``parallel``: the array's parallelism).
  """
  from kdlab import launch
  if parallel < 1:
    raise UserError(f"--parallel={parallel}: must be >= 1")
  if launcher not in launch.LAUNCHERS:
    raise UserError(f"--launcher={launcher!r}: use one of {', '.join(launch.LAUNCHERS)}")
  if worker:
    _die_with_parent()
  sweep, base = plan(config_spec, sweep_file, base_overrides)
  workdir = pathlib.Path(workdir)
  _check_existing(workdir, sweep, base)
  if worker:
    _run_sequential(base, sweep, workdir, list(enumerate(sweep.runs(), 1)), use_wandb, say=_to_stderr, worker=True)
    return []
  check(sweep, base)
  from kdlab.train.prepare import check_writable_dir  # Lazy: imports JAX (loaded by check already).
  check_writable_dir(workdir)
  resources = None
  if launcher != "local":
    resources = launch.resources(load_sweep_file(sweep_file).get("slurm"), slurm or {})

  # Everything is valid: from here on the workdir is written.
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json(workdir / "sweep.json", sweep.to_json())
  runs = sweep.runs()
  todo = [(i, r) for i, r in enumerate(runs, 1) if not finished(workdir, r)]
  workers = min(parallel, len(todo))
  say = lambda *a: print(*a, flush=True)
  say(f"sweep {sweep.name}: {len(sweep.settings)} settings x {len(sweep.seeds)} seeds = {len(runs)} runs "
      f"in {workdir}; {len(runs) - len(todo)} finished earlier" + (f"; {workers} workers" if workers > 1 else ""))
  if resources is not None:
    failed = _run_array(base, sweep, workdir, todo, len(runs), use_wandb, say, launcher, resources, parallel,
                        timeout_s)
  elif workers > 1:
    failed = _run_parallel(config_spec, sweep_file, workdir, base_overrides, todo, len(runs), workers, use_wandb, say)
  else:
    failed = _run_sequential(base, sweep, workdir, todo, use_wandb, say)
  aggregate(workdir)
  say(f"results: {workdir / 'results.md'} and {workdir / 'results.csv'}")
  return failed


def _to_stderr(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


def is_lm(summary: dict[str, Any]) -> bool:
  """Whether a run's summary is a language model's (validation loss instead of test accuracy)."""
  return "val_loss" in summary and "test_accuracy" not in summary


def _result_line(workdir: pathlib.Path, run: Run) -> str:
  s = read_summary(workdir, run)
  if is_lm(s):
    kl = s.get("kl_teacher")
    return (f"val loss {s['val_loss']:.4f} (best {s.get('best_val_loss', float('nan')):.4f}), ppl "
            f"{s.get('val_ppl', float('nan')):.3f}" + (f", KL(teacher, student) {kl:.4f}" if kl is not None else "")
            + f", {s.get('wall_time_s', 0):.0f} s")
  return (f"test accuracy {s['test_accuracy']:.4f} (best epoch {s.get('best_test_accuracy', float('nan')):.4f}), "
          f"{s.get('test_errors')} errors of {s.get('test_examples')}, {s.get('wall_time_s', 0):.0f} s")


def _run_sequential(base, sweep: Sweep, workdir: pathlib.Path, todo, use_wandb: bool, say,
                    worker: bool = False) -> list[str]:
  """Trains the runs of ``todo`` that are unfinished and not held by another process."""
  import jax  # Lazy: the sweep module itself stays light.
  from kdlab.train.loop import train
  failed, total = [], len(sweep.runs())
  for i, run in todo:
    lock = _Lock(workdir, run)
    if not lock.acquire():
      if not worker:
        say(f"[{i}/{total}] {run.name}: being trained by another process, skipped")
        failed.append(run.name)
      continue
    try:
      if finished(workdir, run):  # Finished by another process meanwhile.
        continue
      try:
        train(run_config(base, sweep, run), workdir / run.name, use_wandb=use_wandb, progress=False)
      except Exception as e:  # One diverging setting should not cost the rest of the sweep.
        say(f"[{i}/{total}] {run.name}: FAILED: {type(e).__name__}: {e}")
        failed.append(run.name)
        continue
      if not worker:
        say(f"[{i}/{total}] {run.name}: {_result_line(workdir, run)}")
    finally:
      lock.release()
      jax.clear_caches()  # Each run compiles its own step; don't keep every run's executables.
  return failed


_PARENT_ENV = "KDLAB_SWEEP_PARENT"


def _die_with_parent() -> None:
  """In a --parallel worker: get SIGKILL when the sweep process dies (Linux), so none is left orphaned."""
  parent = os.environ.pop(_PARENT_ENV, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  import signal
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != int(parent):  # The parent died before prctl took effect.
    os.kill(os.getpid(), signal.SIGKILL)


def _run_parallel(config_spec, sweep_file, workdir: pathlib.Path, base_overrides, todo, total: int, workers: int,
                  use_wandb: bool, say) -> list[str]:
  """``workers`` processes share the runs through their locks; prints each result as it appears."""
  package_root = str(pathlib.Path(__file__).resolve().parent.parent)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
             **{_PARENT_ENV: str(os.getpid())})
  cmd = [sys.executable, "-m", "kdlab", "sweep", f"--config={config_spec}", f"--sweep={sweep_file}",
         f"--workdir={workdir}", "--worker", *([] if use_wandb else ["--nowandb"]), *base_overrides]
  procs, reported = [], set()
  try:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
    while True:
      alive = any(p.poll() is None for p in procs)
      for i, run in todo:
        if run.name not in reported and finished(workdir, run):
          reported.add(run.name)
          say(f"[{i}/{total}] {run.name}: {_result_line(workdir, run)}")
      if not alive:
        break
      time.sleep(0.5)
  finally:
    for proc in procs:  # Interrupted: stop our workers; their runs resume next time.
      if proc.poll() is None:
        proc.terminate()
    for proc in procs:
      proc.wait()
  failed = [run.name for _, run in todo if not finished(workdir, run)]
  for name in failed:
    say(f"{name}: FAILED (its worker's error is above)")
  return failed


def _run_array(base, sweep: Sweep, workdir: pathlib.Path, todo, total: int, use_wandb: bool, say, launcher: str,
               resources: Any, parallel: int, timeout_s: float | None) -> list[str]:
  """The runs of ``todo`` as one submitit job array (:func:`kdlab.launch.submit`); prints each result."""
  from kdlab import distributed, launch
  if not todo:
    return []
  tasks = [launch.RunTask(run_config(base, sweep, run), str(workdir / run.name), run.name, use_wandb,
                          distributed.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s) for _, run in todo]
  index = {run.name: (i, run) for i, run in todo}
  say(f"submitted {len(tasks)} runs as a job array ({launcher}: {resources.nodes} node(s) x "
      f"{resources.gpus_per_node} GPU(s) each, {resources.time_min} min); job logs in {workdir / 'submitit'}")
  failed: list[str] = []

  def done(name: str, error: BaseException | None) -> None:
    i, run = index[name]
    if error is None and finished(workdir, run):
      say(f"[{i}/{total}] {name}: {_result_line(workdir, run)}")
    else:
      failed.append(name)
      what = "" if error is None else str(error).strip().splitlines()[-1][:300]
      say(f"[{i}/{total}] {name}: FAILED: {what} (job log in {workdir / 'submitit'})")

  launch.submit(tasks, launcher, resources, workdir / "submitit", parallel, done)
  return failed


# ----------------------------------------------------------------------------------------------
# Aggregation: results.csv (one row per run) and results.md (one row per setting).

def load(workdir: str | pathlib.Path) -> Sweep:
  path = pathlib.Path(workdir) / "sweep.json"
  if not path.exists():
    raise UserError(f"{workdir}: no sweep.json; is this a sweep's --workdir?")
  return Sweep.from_json(json.loads(path.read_text()))


def summaries(workdir: pathlib.Path, sweep: Sweep) -> dict[str, list[tuple[int, dict[str, Any]]]]:
  """Setting name -> [(seed, summary)] of its finished runs, in seed order."""
  out: dict[str, list[tuple[int, dict[str, Any]]]] = {s.name: [] for s in sweep.settings}
  for run in sorted(sweep.runs(), key=lambda r: r.seed):
    summary = read_summary(workdir, run)
    if summary is not None:
      out[run.setting.name].append((run.seed, summary))
  return out


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, (list, tuple)):
    return " ".join(map(str, value)) if all(isinstance(v, (int, float)) for v in value) else json.dumps(value)
  if isinstance(value, dict):
    return json.dumps(value)
  return value


def results_csv(workdir: pathlib.Path, sweep: Sweep) -> str:
  """One row per run (unfinished runs have empty metrics): run, setting, swept values, seed, summary fields."""
  rows = []
  for run in sweep.runs():
    rows.append((run, read_summary(workdir, run) or {}))
  known = LM_SUMMARY_FIELDS if any(is_lm(s) for _, s in rows) else SUMMARY_FIELDS
  extra = sorted({k for _, s in rows for k in s} - set(known))
  fields = [*known, *extra]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["run", "setting", *sweep.paths, "seed", "finished", *fields])
  for run, summary in rows:
    writer.writerow([run.name, run.setting.name, *(_csv_value(run.setting.values[p]) for p in sweep.paths),
                     run.seed, bool(summary), *(_csv_value(summary.get(f)) for f in fields)])
  return out.getvalue()


def mean_std(values: Sequence[float | None], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
  """``"97.10 +/- 0.12"`` (``fmt`` of the mean and the sample std, ddof=1, of ``scale * values``).

  None values are left out; one value is shown alone (it has no spread); none gives a dash.
  """
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  a = scale * np.asarray(values, float)
  if len(a) == 1:
    return fmt.format(a[0])
  return f"{fmt.format(a.mean())} +/- {fmt.format(a.std(ddof=1))}"


def stats(workdir: pathlib.Path, sweep: Sweep) -> list[dict[str, Any]]:
  """Per setting: its seeds' last-epoch and best-epoch test accuracies and the other final metrics.

  Language-model runs have no test accuracy (an empty list): their ``val_loss``, ``best_val_loss``,
  ``val_ppl`` and ``val_accuracy`` lists are given instead.
  """
  by_setting = summaries(workdir, sweep)
  out = []
  for setting in sweep.settings:
    runs = [s for _, s in by_setting[setting.name]]
    row = {
        "setting": setting, "seeds": [seed for seed, _ in by_setting[setting.name]],
        "test_accuracy": [s["test_accuracy"] for s in runs if "test_accuracy" in s],
        "best_test_accuracy": [s.get("best_test_accuracy") for s in runs],
        "test_errors": [s.get("test_errors") for s in runs],
        "test_examples": runs[0].get("test_examples") if runs else None,
        "agreement_top1": [s.get("agreement_top1") for s in runs],
        "kl_teacher": [s.get("kl_teacher") for s in runs],
    }
    if any(is_lm(s) for s in runs):
      row.update({k: [s.get(k) for s in runs] for k in ("val_loss", "best_val_loss", "val_ppl", "val_accuracy")})
    out.append(row)
  return out


def sweep_is_lm(workdir: pathlib.Path, sweep: Sweep) -> bool:
  """Whether the sweep's finished runs are language models."""
  return any("val_loss" in r for r in stats(workdir, sweep))


def _setting_header(sweep: Sweep) -> list[str]:
  """The table columns naming a setting: one per axis, a tied axis by its label only (``Sweep.shown``);
  a seeds-only sweep has no axes, and its one row is named instead."""
  return [sweep.axis_label(a) for a in sweep.axes] if sweep.axes else ["setting"]


def _setting_cells(sweep: Sweep, setting: Setting) -> list[str]:
  return [sweep.tick(a, setting) for a in sweep.axes] if sweep.axes else [setting.name]


def _lm_table(rows: list[dict[str, Any]], sweep: Sweep) -> str:
  means = [np.mean(r["val_loss"]) if r.get("val_loss") else math.inf for r in rows]
  best = int(np.argmin(means)) if min(means, default=math.inf) < math.inf else -1
  header = _setting_header(sweep) + [
      "last val loss (nats/token)", "best val loss", "val ppl", "val token acc (%)", "KL(teacher, student)",
      "agreement top-1 (%)", "seeds"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, r in enumerate(rows):
    setting = r["setting"]
    last = mean_std(r.get("val_loss", []), "{:.4f}")
    cells = _setting_cells(sweep, setting) + [
        f"**{last}**" if i == best and len(rows) > 1 else last, mean_std(r.get("best_val_loss", []), "{:.4f}"),
        mean_std(r.get("val_ppl", []), "{:.3f}"), mean_std(r.get("val_accuracy", []), "{:.2f}", 100),
        mean_std(r["kl_teacher"], "{:.4f}"), mean_std(r["agreement_top1"], "{:.2f}", 100), str(len(r["seeds"]))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def results_table(workdir: pathlib.Path, sweep: Sweep) -> str:
  """The markdown table of results.md: one row per setting, the best last-epoch mean in bold
  (accuracy for classification; the lowest validation loss for language models)."""
  rows = stats(workdir, sweep)
  if any("val_loss" in r for r in rows):
    return _lm_table(rows, sweep)
  examples = next((r["test_examples"] for r in rows if r["test_examples"]), None)
  means = [np.mean(r["test_accuracy"]) if r["test_accuracy"] else -1.0 for r in rows]
  best = int(np.argmax(means)) if max(means, default=-1.0) >= 0 else -1
  header = _setting_header(sweep) + [
      "last-epoch test acc (%)", "best-epoch test acc (%)",
      f"test errors (of {examples})" if examples else "test errors",
      "agreement top-1 (%)", "KL(teacher, student)", "seeds"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, r in enumerate(rows):
    setting = r["setting"]
    last = mean_std(r["test_accuracy"], "{:.2f}", 100)
    cells = _setting_cells(sweep, setting) + [
        f"**{last}**" if i == best and len(rows) > 1 else last,
        mean_std(r["best_test_accuracy"], "{:.2f}", 100), mean_std(r["test_errors"], "{:.1f}"),
        mean_std(r["agreement_top1"], "{:.2f}", 100), mean_std(r["kl_teacher"], "{:.4f}"), str(len(r["seeds"]))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def describe(sweep: Sweep, lm: bool = False) -> str:
  """The command and protocol lines above a results table (``lm``: of language-model runs)."""
  cmd = sweep.command
  overrides = " ".join(cmd["overrides"])
  if lm:
    return (f"`kdlab sweep --config={cmd['config']} --sweep={cmd['sweep']}{' ' + overrides if overrides else ''}`"
            f"\n\nMean +/- sample standard deviation over seeds {sweep.seeds}. Per-token metrics on the validation "
            f"split of the model at the end of training; **best val loss** is the lowest among the periodic "
            f"evaluations (selected on the validation split itself). KL and agreement are against "
            f"config.teachers[0]. Bold: the best setting by mean last validation loss.")
  return (f"`kdlab sweep --config={cmd['config']} --sweep={cmd['sweep']}{' ' + overrides if overrides else ''}`\n\n"
          f"Mean +/- sample standard deviation over seeds {sweep.seeds}. **Last epoch** is the model at the end "
          f"of training, the number to report. **Best epoch** is the highest test accuracy among the periodic "
          f"evaluations: it is selected on the test set itself, so it is optimistic. Bold: the best setting by "
          f"mean last-epoch accuracy.")


def aggregate(workdir: str | pathlib.Path) -> tuple[Sweep, str]:
  """Writes ``results.csv`` and ``results.md`` for the sweep in ``workdir``; returns it and the table."""
  workdir = pathlib.Path(workdir)
  sweep = load(workdir)
  (workdir / "results.csv").write_text(results_csv(workdir, sweep))
  done = sum(finished(workdir, r) for r in sweep.runs())
  table = results_table(workdir, sweep)
  md = (f"# Sweep `{sweep.name}`\n\n{describe(sweep, sweep_is_lm(workdir, sweep))}\n\n{done} of "
        f"{len(sweep.runs())} runs finished; "
        f"one row per run in `results.csv`.\n\n{table}\n")
  (workdir / "results.md").write_text(md)
  return sweep, table

