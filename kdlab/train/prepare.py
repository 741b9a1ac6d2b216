"""``prepare(config) -> Setup``: validate a config and build sources, models and the objective.

All validation happens here, before anything is written, so bad input never touches an existing
workdir. Models are built abstractly where that is enough (``nnx.eval_shape``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from kdlab import mesh as meshlib
from kdlab.errors import UserError
from kdlab.models.protocol import OnRequestTaps
from kdlab.objective import ModelOutput, Objective, Shapes, build as build_objective, make_schedule
from kdlab.train import on_policy, optim, tasks
from kdlab.train import teachers as teacherlib
from kdlab.train.state import Learner
from kdlab.train.step import forward


@dataclasses.dataclass
class Setup:
  """Everything built from a validated config, before any workdir write.

  ``test_source`` is the eval split (``test`` for classification, ``validation`` for text).
  ``objective_teachers`` are the indices in ``teacher_specs`` the objective sees (all but the
  ``eval_only`` ones); ``teacher_specs[0]`` is the one eval metrics compare against.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_source: Any
  test_source: Any
  student_kwargs: dict[str, Any]
  teacher_specs: list[dict[str, Any]]
  objective: Objective
  learner: Learner
  steps_per_epoch: int
  total_steps: int
  ema_decay: Any = None
  shapes: Shapes | None = None
  task: tasks.Task = tasks.CLASSIFICATION
  num_outputs: int = 0
  student_taps: tuple[str, ...] = ()
  objective_teachers: tuple[int, ...] = ()
  cache: Any = None
  param_shardings: Any = None  # the learner's params on the mesh (config.sharding_rules)


def _requested_taps(specs: Sequence[Any]) -> set[str]:
  """Every tap name the objective's terms mention (their ``student`` / ``teacher`` options)."""
  found: set[str] = set()

  def walk(value: Any) -> None:
    if isinstance(value, str):
      found.add(value)
    elif isinstance(value, (list, tuple)):
      for v in value:
        walk(v)

  for spec in specs:
    spec = dict(spec)
    walk(spec.get("student"))
    walk(spec.get("teacher"))
  return found


def _abstract_output(model: nnx.Module, x: jax.ShapeDtypeStruct, requested: set[str]
                     ) -> tuple[ModelOutput, tuple[str, ...]]:
  """The model's abstract output with the requested optional taps (those ``tap_names()`` lists
  but a plain call does not compute, e.g. gpt's ``attn{i}``), and those taps."""
  out = jax.eval_shape(lambda m, x: forward(m, x, train=False), model, x)
  names = model.tap_names() if isinstance(model, OnRequestTaps) else []
  taps = tuple(sorted(n for n in names if n in requested and n not in out.feats))
  if taps:
    out = jax.eval_shape(lambda m, x: forward(m, x, train=False, taps=taps), model, x)
  return out, taps


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates ``config`` and builds sources, models and the objective (abstractly where costly)."""
  mesh = meshlib.make_mesh(config.mesh)
  data_cfg = config.data
  meshlib.check_batch_size(data_cfg.batch_size, mesh)
  meshlib.check_batch_size(data_cfg.eval_batch_size, mesh, "config.data.eval_batch_size")
  task = tasks.for_source(data_cfg.source)
  train_source, test_source = task.load(data_cfg)
  if data_cfg.batch_size > len(train_source):
    raise UserError(f"config.data.batch_size={data_cfg.batch_size} exceeds the {len(train_source)} training examples")
  threads = data_cfg.get("prefetch_threads", 0)
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
    raise UserError(f"config.data.prefetch_threads={threads!r}: use a whole number >= 0 (0: no prefetch threads)")

  student_kwargs = teacherlib.model_kwargs(config.model, "config.model")
  student = nnx.eval_shape(lambda: teacherlib.create_model(student_kwargs, "config.model", config.seed))
  teacher_specs = [teacherlib.teacher_spec(t, i) for i, t in enumerate(config.teachers)]
  teachers = [nnx.eval_shape(lambda s=s, i=i: teacherlib.create_model(s["model"], f"config.teachers[{i}].model", 0))
              for i, s in enumerate(teacher_specs)]
  task.check_models(student, teachers, [f"config.teachers[{i}]" for i in range(len(teachers))], data_cfg)
  rules = config.get("sharding_rules") or ()
  for i, teacher in enumerate(teachers):  # Checks the rules against each teacher's parameters.
    meshlib.param_shardings(teacher, mesh, rules, f"config.teachers[{i}].model")
  on_policy.check(config, task, student)  # config.on_policy (kdlab.train.on_policy)

  batch = task.abstract_batch(train_source, data_cfg.batch_size)
  x = batch[task.input_key]
  requested = _requested_taps(config.objective)
  s_out, student_taps = _abstract_output(student, x, requested)
  t_outs = []
  for spec, teacher in zip(teacher_specs, teachers):
    t_out, spec["taps"] = _abstract_output(teacher, x, requested)
    t_outs.append(t_out)
  task.check_outputs(s_out, t_outs, train_source, data_cfg)
  objective_teachers = tuple(i for i, spec in enumerate(teacher_specs) if not spec["eval_only"])
  t_outs = [t_outs[i] for i in objective_teachers]
  teacher_names = [teacher_specs[i]["name"] for i in objective_teachers]
  ema_decay = None
  if config.get("ema_teacher"):
    ema_decay = make_schedule(config.ema_teacher.get("decay", 0.999), "config.ema_teacher.decay")
    _check_decay(config.ema_teacher.get("decay", 0.999), ema_decay)
    t_outs, teacher_names = [*t_outs, s_out], [*teacher_names, "ema"]
  cache = teacherlib.open_run_cache(config, batch)
  shapes = Shapes(s_out, t_outs, teacher_names, len(train_source), batch)
  objective = build_objective(config.objective, shapes, nnx.Rngs(config.seed + 1))

  steps_per_epoch = len(train_source) // data_cfg.batch_size
  total_steps = config.train.get("num_steps") or int(config.train.num_epochs * steps_per_epoch)
  if total_steps <= 0:
    raise UserError("config.train.num_epochs (or num_steps) must be > 0")
  optim.make(config.optimizer, steps_per_epoch, total_steps)  # Validates the optimizer fields.
  warmup = config.get("connector_warmup_steps", 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise UserError(f"config.connector_warmup_steps must be an int >= 0, got {warmup!r}")
  learner = Learner(teacherlib.create_model(student_kwargs, "config.model", config.seed), objective.connectors())
  param_shardings = meshlib.param_shardings(learner, mesh, rules, "config.model")
  return Setup(config, mesh, train_source, test_source, student_kwargs, teacher_specs, objective, learner,
               steps_per_epoch, total_steps, ema_decay, shapes, task, int(s_out.logits.shape[-1]), student_taps,
               objective_teachers, cache, param_shardings)


def _check_decay(value: Any, schedule: Any) -> None:
  """EMA decays must lie in [0, 1) (checked at the schedule's ends for schedules)."""
  probes = [value] if isinstance(value, (int, float)) else [float(schedule(0)), float(schedule(10**9))]
  for decay in probes:
    if not 0.0 <= decay < 1.0:
      raise UserError(f"config.ema_teacher.decay must be in [0, 1), got {decay}")


def check_workdir(workdir: pathlib.Path, config_json: str) -> None:
  existing = workdir / "config.json"
  if existing.exists() and json.loads(existing.read_text()) != json.loads(config_json):
    raise UserError(f"--workdir={workdir}: it holds a run with a different config; use a new workdir "
                    f"(or delete it) to start another run")
