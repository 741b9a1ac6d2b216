"""``prepare(config) -> Setup``: validate a config and build sources, models and the objective.

All validation happens here, before anything is written, so bad input never touches an existing
workdir. Models are built abstractly where that is enough (``nnx.eval_shape``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdlab import mesh as meshlib
from kdlab.config import one_line, show
from kdlab.errors import UserError
from kdlab.models.protocol import OnRequestTaps
from kdlab.objective import ModelOutput, Objective, Shapes, build as build_objective, make_schedule
from kdlab.train import on_policy, optim, ranges, student_init, tasks
from kdlab.train import teachers as teacherlib
from kdlab.train.state import Learner, TrainState, split_learner
from kdlab.train.step import TEACHER_INPUT, check_microbatches, forward, make_eval_step


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
  learner: Learner  # abstract (nnx.eval_shape); make_learner() builds it (see kdlab.train.state.create_state)
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
  make_learner: Any = None  # () -> Learner, the student initialized from config.seed and the connectors
  student_init: Any = None  # how a fresh run's student starts (kdlab.train.student_init.describe)
  student_vocab: int | None = None  # the student's logits compared over its first student_vocab columns


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
    try:
      out = jax.eval_shape(lambda m, x: forward(m, x, train=False, taps=taps), model, x)
    except ValueError as e:  # e.g. attn{i} of a scanned gpt
      raise UserError(f"config.objective: taps {list(taps)}: {e}") from None
  return out, taps


def prepare(config: ml_collections.ConfigDict, *, need_weights: bool = True) -> Setup:
  """Validates ``config`` and builds sources, models and the objective (abstractly where costly).

  ``need_weights=False`` (``kdlab plan``) accepts teachers whose checkpoints do not exist yet.
  """
  ranges.check(config)
  mesh = meshlib.make_mesh(config.mesh)
  data_cfg = config.data
  meshlib.check_batch_size(data_cfg.batch_size, mesh)
  check_microbatches(data_cfg.batch_size, config.train.get("microbatches", 1), meshlib.data_parallel_size(mesh))
  meshlib.check_batch_size(data_cfg.eval_batch_size, mesh, "config.data.eval_batch_size")
  task = tasks.for_source(data_cfg.source)
  train_source, test_source = task.load(data_cfg)
  if data_cfg.batch_size > len(train_source):
    raise UserError(f"config.data.batch_size={data_cfg.batch_size} exceeds the {len(train_source)} training examples")
  threads = data_cfg.get("prefetch_threads", 0)
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
    raise UserError(f"config.data.prefetch_threads={show(threads)}: use a whole number >= 0 (0: no prefetch threads)")

  student_kwargs = teacherlib.model_kwargs(config.model, "config.model")
  student_kwargs.update(teacherlib.precision_kwargs(config, student_kwargs, "config"))
  student = nnx.eval_shape(lambda: teacherlib.create_model(student_kwargs, "config.model", config.seed))
  teacher_specs = [teacherlib.teacher_spec(t, i, need_weights=need_weights) for i, t in enumerate(config.teachers)]
  teachers = [nnx.eval_shape(lambda s=s, i=i: teacherlib.create_model(s["model"], f"config.teachers[{i}].model", 0))
              for i, s in enumerate(teacher_specs)]
  task.check_models(student, teachers, [f"config.teachers[{i}]" for i in range(len(teachers))], data_cfg)
  rules = config.get("sharding_rules") or ()
  for i, (spec, teacher) in enumerate(zip(teacher_specs, teachers)):  # Checks each teacher's rules.
    own = spec["sharding_rules"]
    meshlib.param_shardings(teacher, mesh, rules if own is None else own, f"config.teachers[{i}].model",
                            "config.sharding_rules" if own is None else f"config.teachers[{i}].sharding_rules")
  on_policy.check(config, task, student)  # config.on_policy (kdlab.train.on_policy)
  init = student_init.describe(config, teacher_specs, student, teachers)

  batch = task.abstract_batch(train_source, data_cfg.batch_size)
  x = batch[task.input_key]
  requested = _requested_taps(config.objective)
  s_out, student_taps = _fitted_output(student, student_kwargs, x, requested, "config.model", data_cfg.source)
  # Cross-tokenizer distillation (config.data.teacher_tokenizer): teachers read the text tokenized their way.
  cross = TEACHER_INPUT in batch
  t_outs = []
  for i, (spec, teacher) in enumerate(zip(teacher_specs, teachers)):
    t_out, spec["taps"] = _fitted_output(teacher, spec["model"], batch[TEACHER_INPUT] if cross else x, requested,
                                         f"config.teachers[{i}]", data_cfg.source)
    spec["input_key"] = TEACHER_INPUT if cross else None
    t_outs.append(t_out)
  # Teacher and student of one tokenizer, embeddings padded to different sizes: compare the common columns.
  vocab = None if cross else teacherlib.common_vocab(config, teacher_specs, s_out, t_outs)
  student_vocab = None
  if vocab is not None:
    student_vocab = vocab if s_out.logits.shape[-1] > vocab else None
    s_out = _limit_vocab(s_out, vocab)
    for i, spec in enumerate(teacher_specs):
      spec["vocab"] = vocab if t_outs[i].logits.shape[-1] > vocab else None
      t_outs[i] = _limit_vocab(t_outs[i], vocab)
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
    raise UserError(f"config.train.num_epochs={config.train.num_epochs!r}: {steps_per_epoch} steps per epoch make "
                    f"{total_steps} training steps; use more epochs or set config.train.num_steps > 0")
  optim.make(config.optimizer, steps_per_epoch, total_steps)  # Validates the optimizer fields.
  connectors = objective.connectors()

  def make_learner() -> Learner:
    return Learner(teacherlib.create_model(student_kwargs, "config.model", config.seed), connectors)

  learner = nnx.eval_shape(make_learner)
  param_shardings = meshlib.param_shardings(learner, mesh, rules, "config.model")
  return Setup(config, mesh, train_source, test_source, student_kwargs, teacher_specs, objective, learner,
               steps_per_epoch, total_steps, ema_decay, shapes, task, int(s_out.logits.shape[-1]), student_taps,
               objective_teachers, cache, param_shardings, make_learner, init, student_vocab)


def eval_metric_names(setup: Setup, teachers: Sequence[Any], teacher_vars: Sequence[Any]) -> list[str]:
  """The names of the eval metrics a run of ``setup`` logs (``test/accuracy``, ...), traced abstractly
  (nothing runs) with its teachers (:func:`kdlab.train.teachers.load_teachers`); e.g. to check
  ``config.checkpoint.best_metric`` before anything is written."""
  graphdef, params, rest = split_learner(setup.learner)
  eval_step = make_eval_step(graphdef, teachers, setup.task, setup.student_vocab)
  batch = next(iter(setup.task.eval_batches(setup.test_source, setup.config.data)))

  def metrics(params, rest, teacher_vars, batch):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state={}, term_states={},
                       key=jnp.zeros((2,), jnp.uint32))
    return eval_step(state, teacher_vars, batch, jnp.zeros((setup.num_outputs,), jnp.float32))

  shapes = jax.eval_shape(metrics, params, rest, teacher_vars, batch)
  zeros = {k: [0.0] * s[0].shape[0] if s[0].ndim else 1.0 for k, s in shapes.items()}
  return sorted(setup.task.finalize(zeros))


def _fitted_output(model: nnx.Module, kwargs: dict[str, Any], x: jax.ShapeDtypeStruct, requested: set[str],
                   field: str, source: str) -> tuple[ModelOutput, tuple[str, ...]]:
  """:func:`_abstract_output` of ``model`` (built from ``kwargs``), with a model that cannot take the
  data's input (its input size or channels are another data set's) refused by one line naming ``field``."""
  in_features = kwargs.get("in_features")
  size = math.prod(x.shape[1:])
  if isinstance(in_features, int) and x.ndim > 2 and in_features != size:
    data = f"config.data.source={source!r} has inputs of shape {tuple(x.shape[1:])} = {size} features"
    if field == "config.model":
      raise UserError(f"config.model.in_features={in_features}: {data}; use --config.model.in_features={size}")
    raise UserError(f"{field}: the teacher's model takes in_features={in_features} but {data}; {_TEACHER_FIX}")
  try:
    return _abstract_output(model, x, requested)
  except (TypeError, ValueError) as e:
    raise UserError(f"{field}: {type(model).__name__} cannot take the inputs of config.data.source={source!r}, of "
                    f"shape {tuple(x.shape[1:])} ({one_line(str(e)) or type(e).__name__}); "
                    + ("make config.model take that shape (e.g. its in_channels or input_shape)"
                       if field == "config.model" else _TEACHER_FIX)) from None


_TEACHER_FIX = "use a teacher trained on this data (a run whose model takes the student's input)"


def _limit_vocab(out: ModelOutput, vocab: int) -> ModelOutput:
  """``out`` (abstract) with only its first ``vocab`` logits, as ``forward(..., vocab=...)`` gives them."""
  logits = jax.ShapeDtypeStruct((*out.logits.shape[:-1], vocab), out.logits.dtype)
  unembedding = None if out.unembedding is None else jax.ShapeDtypeStruct(
      (out.unembedding.shape[0], vocab), out.unembedding.dtype)
  return dataclasses.replace(out, logits=logits, unembedding=unembedding)


def _check_decay(value: Any, schedule: Any) -> None:
  """EMA decays must lie in [0, 1) (checked at the schedule's ends for schedules)."""
  probes = [value] if isinstance(value, (int, float)) else [float(schedule(0)), float(schedule(10**9))]
  for decay in probes:
    if not 0.0 <= decay < 1.0:
      raise UserError(f"config.ema_teacher.decay must be in [0, 1), got {decay}")


def check_workdir(workdir: pathlib.Path, config_json: str) -> None:
  """Refuses a workdir that cannot be written (:func:`check_writable_dir`) or holds another run. The
  layout fields (:data:`LAYOUT_FIELDS`: the mesh and the sharding rules) may differ: a run resumes on
  another mesh, its arrays resharded. So may :data:`RESUMABLE_FIELDS` (the learning rate, its schedule
  and warm-up, the loss guard): a diverged run continues from its last good checkpoint with a lower one."""
  check_writable_dir(workdir)
  existing = workdir / "config.json"
  if existing.exists() and _without_layout(json.loads(existing.read_text())) != _without_layout(json.loads(config_json)):
    raise UserError(f"--workdir={workdir}: it holds a run with a different config; use a new workdir "
                    f"(or delete it) to start another run")


def check_writable_dir(path: str | pathlib.Path, flag: str = "--workdir") -> None:
  """``path`` is a directory this process can write in, or can be created: its nearest existing
  ancestor is a writable directory. Else a one-line :class:`UserError` naming ``flag``."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}={path}: it is a file, not a directory; give a directory (a new one, or the run's)")
  probe = path.absolute()
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  if not probe.is_dir():
    raise UserError(f"{flag}={path}: {probe} is a file, so the directory cannot be created; choose another path")
  if not os.access(probe, os.W_OK | os.X_OK):
    what = "the directory" if probe == path.absolute() else f"{probe}, where it would be created,"
    raise UserError(f"{flag}={path}: {what} is not writable (permission denied); choose a writable place or fix "
                    f"its permissions")


LAYOUT_FIELDS = ("mesh", "sharding_rules")
# Fields of a section that a resumed run may change: none alters the train state's arrays.
RESUMABLE_FIELDS = {"optimizer": ("learning_rate", "schedule", "warmup_epochs"), "train": ("max_loss",)}


def _without_layout(config: dict[str, Any]) -> dict[str, Any]:
  config = {k: v for k, v in config.items() if k not in LAYOUT_FIELDS}
  for section, fields in RESUMABLE_FIELDS.items():
    if isinstance(config.get(section), dict):
      config[section] = {k: v for k, v in config[section].items() if k not in fields}
  if isinstance(config.get("teachers"), list):
    config["teachers"] = [{k: v for k, v in t.items() if k != "sharding_rules"} if isinstance(t, dict) else t
                          for t in config["teachers"]]
  return config
