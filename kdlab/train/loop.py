"""``train(config, workdir)``: validate everything, then train, evaluate, checkpoint and log.

All validation happens in :func:`prepare`, before anything is written, so bad
input never touches an existing workdir. What depends on the kind of data (image
classification or language modelling: model inputs, batches, metrics, summary) is
the task's (:mod:`kdlab.train.tasks`), picked from ``config.data.source``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from kdlab import data as kdata
from kdlab import models, objectives
from kdlab.errors import UserError
from kdlab.train import checkpoint, mesh as meshlib, on_policy, optim, tasks
from kdlab.train.logging import MetricsLog, WandbLog
from kdlab.train.state import Learner, TrainState, init_state
from kdlab.train.step import (Teacher, accumulate, forward, make_eval_step, make_train_step, reduce_metrics,
                              run_teachers)


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
  objective: objectives.Objective
  learner: Learner
  steps_per_epoch: int
  total_steps: int
  ema_decay: Any = None
  shapes: objectives.Shapes | None = None
  task: tasks.Task = tasks.CLASSIFICATION
  num_outputs: int = 0
  student_taps: tuple[str, ...] = ()
  objective_teachers: tuple[int, ...] = ()
  cache: Any = None
  param_shardings: Any = None  # the learner's params on the mesh (config.sharding_rules)


def _model_kwargs(cfg: Any, field: str) -> dict[str, Any]:
  kwargs = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = kwargs.get("name")
  if name not in models.names():
    raise UserError(f"{field}.name: unknown model {name!r}; choose one of {', '.join(models.names())}")
  return kwargs


def _create(kwargs: dict[str, Any], field: str, seed: int) -> nnx.Module:
  kwargs = dict(kwargs)
  try:
    return models.create(kwargs.pop("name"), seed=seed, **kwargs)
  except TypeError as e:
    raise UserError(f"{field}: {e}") from None
  except ValueError as e:
    raise UserError(f"{field}: {e}") from None


def _teacher_spec(entry: Any, i: int) -> dict[str, Any]:
  """Resolves ``config.teachers[i]``: its checkpoint and model (from the teacher run's config.json)."""
  field = f"config.teachers[{i}]"
  entry = dict(entry)
  init = entry.get("init")
  if not init:
    raise UserError(f"{field}.init: missing; set it to a finished run's checkpoints/ folder")
  ckpt = pathlib.Path(init)
  if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
    raise UserError(f"{field}.init: no teacher checkpoint at {init!r}; train the teacher first "
                    f"(kdlab train --config=...:teacher --workdir=...) or fix the path")
  run_config = ckpt.parent / "config.json"
  if run_config.exists():
    model = json.loads(run_config.read_text())["model"]
  elif "model" in entry:
    model = entry["model"] if isinstance(entry["model"], dict) else {"name": entry["model"]}
  else:
    raise UserError(f"{field}.model: {init!r} has no config.json beside it; give the teacher's model dict")
  eval_only = entry.get("eval_only", False)
  if not isinstance(eval_only, bool):
    raise UserError(f"{field}.eval_only must be True or False, got {eval_only!r}")
  return {"name": entry.get("name", f"t{i}"), "init": str(ckpt), "model": _model_kwargs(model, f"{field}.model"),
          "eval_only": eval_only}


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
                     ) -> tuple[objectives.ModelOutput, tuple[str, ...]]:
  """The model's abstract output with the requested optional taps (those ``tap_names()`` lists
  but a plain call does not compute, e.g. gpt's ``attn{i}``), and those taps."""
  out = jax.eval_shape(lambda m, x: forward(m, x, train=False), model, x)
  names = model.tap_names() if callable(getattr(model, "tap_names", None)) else []
  taps = tuple(sorted(n for n in names if n in requested and n not in out.feats))
  if taps:
    out = jax.eval_shape(lambda m, x: forward(m, x, train=False, taps=taps), model, x)
  return out, taps


def _open_cache(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> Any:
  """``config.teacher_cache``: opens it (checking its fingerprint) and adds its keys to the abstract ``batch``."""
  path = config.get("teacher_cache")
  if not path:
    return None
  from kdlab import teacher_cache  # Lazy: only runs that read a cache need it.
  cache = teacher_cache.open_cache(path, expected_fingerprint=teacher_cache.fingerprint(config))
  index = batch["index"]
  sample = cache.lookup(np.arange(index.shape[0]) % max(len(cache), 1))
  for k, v in sample.items():
    batch[k] = jax.ShapeDtypeStruct((index.shape[0], *v.shape[1:]), v.dtype)
  return cache


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

  student_kwargs = _model_kwargs(config.model, "config.model")
  student = nnx.eval_shape(lambda: _create(student_kwargs, "config.model", config.seed))
  teacher_specs = [_teacher_spec(t, i) for i, t in enumerate(config.teachers)]
  teachers = [nnx.eval_shape(lambda s=s, i=i: _create(s["model"], f"config.teachers[{i}].model", 0))
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
    ema_decay = objectives.make_schedule(config.ema_teacher.get("decay", 0.999), "config.ema_teacher.decay")
    _check_decay(config.ema_teacher.get("decay", 0.999), ema_decay)
    t_outs, teacher_names = [*t_outs, s_out], [*teacher_names, "ema"]
  cache = _open_cache(config, batch)
  shapes = objectives.Shapes(s_out, t_outs, teacher_names, len(train_source), batch)
  objective = objectives.build(config.objective, shapes, nnx.Rngs(config.seed + 1))

  steps_per_epoch = len(train_source) // data_cfg.batch_size
  total_steps = config.train.get("num_steps") or int(config.train.num_epochs * steps_per_epoch)
  if total_steps <= 0:
    raise UserError("config.train.num_epochs (or num_steps) must be > 0")
  optim.make(config.optimizer, steps_per_epoch, total_steps)  # Validates the optimizer fields.
  warmup = config.get("connector_warmup_steps", 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise UserError(f"config.connector_warmup_steps must be an int >= 0, got {warmup!r}")
  learner = Learner(_create(student_kwargs, "config.model", config.seed), objective.connectors())
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


def _check_workdir(workdir: pathlib.Path, config_json: str) -> None:
  existing = workdir / "config.json"
  if existing.exists() and json.loads(existing.read_text()) != json.loads(config_json):
    raise UserError(f"--workdir={workdir}: it holds a run with a different config; use a new workdir "
                    f"(or delete it) to start another run")


def _load_teachers(setup: Setup, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = ()
                   ) -> tuple[list[Teacher], list[Any]]:
  """Frozen teachers and their variables ``(params, rest)`` on the mesh: params placed by ``rules``
  (``config.sharding_rules``), the rest replicated."""
  teachers, variables = [], []
  for i, spec in enumerate(setup.teacher_specs):
    field = f"config.teachers[{i}]"
    model = _create(spec["model"], f"{field}.model", 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    saved_params, saved_rest = checkpoint.load_student_variables(spec["init"], f"{field}.init")
    try:
      loaded = (_like(nnx.to_pure_dict(params), saved_params), _like(nnx.to_pure_dict(rest), saved_rest, strict=False))
    except (KeyError, ValueError):
      raise UserError(f"{field}.init: the checkpoint does not match model {spec['model']['name']!r} "
                      f"(different architecture or sizes)") from None
    shardings = meshlib.param_shardings(model, mesh, rules, f"{field}.model")
    variables.append((jax.device_put(loaded[0], shardings), jax.device_put(loaded[1], meshlib.replicated(mesh))))
    teachers.append(Teacher(spec["name"], graphdef, tuple(spec.get("taps", ()))))
  return teachers, variables


def _like(fresh: Any, saved: Any, strict: bool = True) -> Any:
  """``saved`` values in the structure of ``fresh`` (orbax turns int keys into strings).

  With ``strict=False`` missing entries and PRNG keys keep their fresh values.
  """
  if isinstance(fresh, dict):
    saved = saved if isinstance(saved, dict) else {}
    return {k: _like(v, saved.get(k, saved.get(str(k))), strict) for k, v in fresh.items()}
  if saved is None or jnp.issubdtype(fresh.dtype, jax.dtypes.prng_key):
    if strict:
      raise KeyError("missing entry")
    return fresh
  if saved.shape != fresh.shape:
    raise ValueError(f"shape {saved.shape} != {fresh.shape}")
  return jnp.asarray(saved, fresh.dtype)


def evaluate(eval_step, state: TrainState, teacher_vars: Sequence[Any], setup: Setup,
             logit_offset: np.ndarray | None = None) -> dict[str, Any]:
  """Student metrics over the whole eval split of ``setup``."""
  offset = jnp.zeros((setup.num_outputs,), jnp.float32) if logit_offset is None else jnp.asarray(logit_offset)
  totals: dict[str, Any] = {}
  for batch in setup.task.eval_batches(setup.test_source, setup.config.data):
    totals = accumulate(totals, eval_step(state, teacher_vars, _global(batch, setup.mesh), offset))
  return setup.task.finalize(reduce_metrics(totals))


def _global(batch: dict[str, Any], mesh: jax.sharding.Mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split over the data axes (axis 1 when ``stacked``)."""
  sharding = meshlib.batch_sharding(mesh, leading_axes=1 if stacked else 0)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, use_wandb: bool = True,
          progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the summary also written to ``summary.json``.

  With ``config.born_again.generations = K`` it trains a born-again chain instead (see
  :func:`kdlab.train.born_again.train_chain`).
  """
  if config.get("born_again") and config.born_again.get("generations") is not None:
    from kdlab.train.born_again import train_chain
    return train_chain(config, workdir, use_wandb=use_wandb, progress=progress)
  return train_run(config, workdir, use_wandb=use_wandb, progress=progress)


def train_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, use_wandb: bool = True,
              progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) one run in ``workdir``.

  With ``config.vmap_seeds = S > 1`` it trains seeds ``config.seed .. config.seed + S - 1``
  (independent init, dropout and data order) in one compiled, ``jax.vmap``-ed step; seed
  ``k`` writes the same outputs a separate run would, in ``workdir/seed{k}``, and
  ``workdir/summary.json`` lists their summaries.
  """
  num_seeds = int(config.get("vmap_seeds") or 1)
  if num_seeds <= 1:
    return _train_group([config], [pathlib.Path(workdir)], use_wandb=use_wandb, progress=progress)[0]
  workdir = pathlib.Path(workdir)
  configs = []
  for k in range(config.seed, config.seed + num_seeds):
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed, c.vmap_seeds = k, 0
    configs.append(c)
  config_json = config.to_json(indent=2, sort_keys=True)
  _check_workdir(workdir, config_json)
  summaries = _train_group(configs, [workdir / f"seed{c.seed}" for c in configs], use_wandb=use_wandb,
                           progress=progress, before_write=lambda: _write_config(workdir, config_json))
  summary: dict[str, Any] = {"seeds": [c.seed for c in configs], "runs": summaries}
  for field in tasks.for_source(config.data.source).headline_fields:
    values = [s.get(field) for s in summaries]
    if all(v is not None for v in values):
      summary[field] = float(np.mean(values))
  summary["wall_time_s"] = summaries[0]["wall_time_s"]
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _write_config(workdir: pathlib.Path, config_json: str) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_json)


def _state_shardings(state: TrainState, setup: Setup, seeds: int = 1) -> TrainState:
  """Where each array of ``state`` lives: the params, their optimizer state and the EMA copy by
  ``config.sharding_rules`` (``setup.param_shardings``), the rest replicated; with ``seeds > 1``
  for the stacked state (a leading, unsplit seed axis)."""
  rep = meshlib.replicated(setup.mesh)
  params = setup.param_shardings
  shardings = TrainState(
      step=rep, params=params, rest=jax.tree.map(lambda _: rep, state.rest),
      opt_state=meshlib.follow_params(state.opt_state, state.params, params, rep),
      term_states=jax.tree.map(lambda _: rep, state.term_states), key=rep,
      ema=params if state.ema else jax.tree.map(lambda _: rep, state.ema))
  if seeds == 1:
    return shardings
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(setup.mesh, jax.P(None, *s.spec)), shardings)


def _stack(trees: Sequence[Any]) -> Any:
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
  return [tree] if n == 1 else [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def _train_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[pathlib.Path], *,
                 use_wandb: bool, progress: bool, before_write: Any = None) -> list[dict[str, Any]]:
  """Trains runs that differ only in their seed; several are ``jax.vmap``-ed into one step."""
  start = time.time()
  n = len(configs)
  setups = [prepare(c) for c in configs]
  setup, config = setups[0], configs[0]
  config_jsons = [c.to_json(indent=2, sort_keys=True) for c in configs]
  for workdir, config_json in zip(workdirs, config_jsons):
    _check_workdir(workdir, config_json)
  mesh = setup.mesh
  teachers, teacher_vars = _load_teachers(setup, mesh, config.get("sharding_rules") or ())
  finished = _finished_summaries(workdirs, setup.total_steps)
  if finished is not None:  # Rerun of a finished run: nothing to train and nothing to rewrite.
    return finished

  # Everything is valid: from here on the workdirs are written.
  if before_write is not None:
    before_write()
  for workdir, config_json in zip(workdirs, config_jsons):
    _write_config(workdir, config_json)
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, states = None, []
  for s, c in zip(setups, configs):
    graphdef, state = init_state(s.learner, tx, s.objective.init_state(), c.seed, ema=s.ema_decay is not None)
    states.append(jax.device_put(state, _state_shardings(state, s)))
  task = setup.task
  read = grain.ReadOptions(num_threads=config.data.get("prefetch_threads", 0))
  data_iters = [iter(task.train_dataset(s.train_source, c.data, c.seed).to_iter_dataset(read))
                for s, c in zip(setups, configs)]
  ckpts = [checkpoint.Checkpointer(w / "checkpoints") for w in workdirs]
  latest = [c.latest_step() for c in ckpts]
  if any(step is not None for step in latest):
    if any(step is None for step in latest):
      raise UserError(f"{workdirs[0].parent}: some seeds have checkpoints and others not; use a new workdir")
    common = min(latest)  # Seeds save together; a kill between their saves leaves one step behind.
    for i, ckpt in enumerate(ckpts):
      states[i], data_state = ckpt.restore(states[i], step=common)
      data_iters[i].set_state(data_state)
  state_sharding = _state_shardings(states[0], setup, n)
  state = jax.device_put(_stack(states), state_sharding)
  start_step = int(states[0].step)

  # Eval-only teachers (and all of them, with a teacher cache) are run by the eval step alone.
  step_teachers = [teachers[i] for i in setup.objective_teachers]
  step_teacher_vars = [teacher_vars[i] for i in setup.objective_teachers]
  step_fn = make_train_step(graphdef, setup.objective, tx, step_teachers, setup.ema_decay,
                            term_grad_norms=bool(config.train.get("term_grad_norms", False)),
                            connector_warmup_steps=config.get("connector_warmup_steps", 0),
                            task=task, student_taps=setup.student_taps)
  eval_fn = make_eval_step(graphdef, teachers, task)
  if n > 1:
    step_fn = jax.vmap(step_fn, in_axes=(0, None, 0))
    eval_fn = jax.vmap(eval_fn, in_axes=(0, None, None, None))
  # The state keeps its shardings from step to step (and is updated in place).
  train_step = jax.jit(step_fn, out_shardings=(state_sharding, meshlib.replicated(mesh)), donate_argnums=(0,))
  eval_step = jax.jit(eval_fn)
  # config.on_policy: some batches become the student's own samples (kdlab.train.on_policy).
  policy = on_policy.build(configs, setup, graphdef, meshlib.batch_sharding(mesh, leading_axes=1 if n > 1 else 0))
  if policy is not None:
    train_step = policy.wrap(train_step)
  logs = [MetricsLog(w, start_step) for w in workdirs]
  wandb_logs = [WandbLog(w, json.loads(j), enabled=use_wandb, project=c.get("wandb_project", "kdlab"),
                         group=c.get("wandb_group") or None, tags=tuple(c.get("wandb_tags", ())))
                for w, j, c in zip(workdirs, config_jsons, configs)]

  def evaluate_all() -> list[dict[str, Any]]:
    totals: dict[str, Any] = {}
    for batch in task.eval_batches(setup.test_source, config.data):
      totals = accumulate(totals, eval_step(state, teacher_vars, _global(batch, mesh), offset))
    return [task.finalize(reduce_metrics(t)) for t in _unstack(totals, n)]

  offset = jnp.zeros((setup.num_outputs,), jnp.float32)
  eval_every = max(1, int(round(config.train.eval_every_epochs * setup.steps_per_epoch)))
  ckpt_every = max(1, int(round(config.train.checkpoint_every_epochs * setup.steps_per_epoch)))
  log_every = max(1, min(config.train.log_every_steps, setup.steps_per_epoch))
  totals: dict[str, Any] = {}
  best = [_best(w, task) for w in workdirs]
  steps_timed, time_in_steps = 0, 0.0
  final = None
  bar = tqdm(total=setup.total_steps, initial=start_step, disable=not progress, desc=workdirs[0].name,
             mininterval=2.0, dynamic_ncols=True)
  for step in range(start_step + 1, setup.total_steps + 1):
    batches = [next(it) for it in data_iters]
    if setup.cache is not None:  # The teacher's stored outputs for these sequences (config.teacher_cache).
      batches = [{**b, **setup.cache.lookup(b["index"])} for b in batches]
    batch = _global(batches[0] if n == 1 else {k: np.stack([b[k] for b in batches]) for k in batches[0]},
                    mesh, stacked=n > 1)
    t0 = time.time()
    state, metrics = train_step(state, step_teacher_vars, batch)
    totals = accumulate(totals, metrics)
    save_now = step % ckpt_every == 0 or step == setup.total_steps
    # Logging at every checkpoint too keeps the averaging windows of a resumed run identical.
    if step % log_every == 0 or save_now:
      for i, values in enumerate(reduce_metrics(t) for t in _unstack(totals, n)):
        if not math.isfinite(values["loss"]):
          raise FloatingPointError(f"{workdirs[i]}: loss became {values['loss']} at step {step}; "
                                   f"lower the learning rate or check the inputs")
        values["epoch"] = step / setup.steps_per_epoch
        logs[i].write(step, values)
        wandb_logs[i].write(step, values)
      totals = {}
      bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    if step > start_step + 1:  # The first step compiles; leave it out of the speed figure.
      jax.block_until_ready(state.step)
      steps_timed += 1
      time_in_steps += time.time() - t0
    if step % eval_every == 0 or step == setup.total_steps:
      final = evaluate_all()
      for i, values in enumerate(final):
        if best[i] is None or task.better(values[task.best_key], best[i]):
          best[i] = values[task.best_key]
        logs[i].write(step, {**values, "epoch": step / setup.steps_per_epoch})
        wandb_logs[i].write(step, values)
    if save_now:
      for ckpt, s, it in zip(ckpts, _unstack(state, n), data_iters):
        ckpt.save(step, s, it.get_state())
    bar.update(1)
  bar.close()

  summaries = []
  for i, values in enumerate(final if final is not None else evaluate_all()):
    summary = {
        **task.summary(values, best[i], setup.test_source, setup.total_steps),
        "wall_time_s": time.time() - start,
        # Each run advanced this many steps per second (all n runs together: n times as many).
        "steps_per_s": steps_timed / time_in_steps if time_in_steps else None,
        "runs_in_step": n,
    }
    (workdirs[i] / "summary.json").write_text(json.dumps(summary, indent=2))
    wandb_logs[i].write(setup.total_steps, {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    wandb_logs[i].close()
    ckpts[i].close()
    summaries.append(summary)
  return summaries


def _finished_summaries(workdirs: Sequence[pathlib.Path], total_steps: int) -> list[dict[str, Any]] | None:
  """The saved summaries if every run in ``workdirs`` finished (``summary.json`` and a final checkpoint)."""
  summaries = []
  for workdir in workdirs:
    if not (workdir / "summary.json").exists() or not (workdir / "checkpoints").is_dir():
      return None
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    latest = ckpt.latest_step()
    ckpt.close()
    if latest != total_steps:
      return None
    summaries.append(json.loads((workdir / "summary.json").read_text()))
  return summaries


def _best(workdir: pathlib.Path, task: tasks.Task) -> float | None:
  """The best ``task.best_key`` among the evaluations already logged in ``workdir`` (a resumed run)."""
  from kdlab.train.logging import read_metrics
  best = None
  for m in read_metrics(workdir):
    value = m.get(task.best_key)
    if value is not None and (best is None or task.better(value, best)):
      best = value
  return best


def evaluate_run(workdir: str | pathlib.Path, *, logit_offset: np.ndarray | None = None) -> dict[str, Any]:
  """Eval metrics of a finished run's last checkpoint, optionally with ``logit_offset [C]`` added."""
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  setup = prepare(config)
  teachers, teacher_vars = _load_teachers(setup, setup.mesh, config.get("sharding_rules") or ())
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, state = init_state(setup.learner, tx, setup.objective.init_state(), config.seed,
                               ema=setup.ema_decay is not None)
  state, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore(
      jax.device_put(state, _state_shardings(state, setup)))
  eval_step = jax.jit(make_eval_step(graphdef, teachers, setup.task))
  return evaluate(eval_step, state, teacher_vars, setup, logit_offset)


def evaluate_ensemble(checkpoint_dirs: Sequence[str | pathlib.Path], config: ml_collections.ConfigDict
                      ) -> dict[str, Any]:
  """Test metrics of the ensemble (mean of probabilities) of finished runs' checkpoints.

  ``config`` gives the data (its ``data`` fields); every member must predict
  the same classes. Returns ``test/accuracy``, ``test/errors``,
  ``test/errors_per_class`` and ``test/ce`` of the ensemble.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.teachers = [dict(init=str(d), name=f"member{i}") for i, d in enumerate(checkpoint_dirs)]
  config.objective = [dict(loss="ce", weight=1.0)]
  config.ema_teacher = None
  setup = prepare(config)
  if setup.task is not tasks.CLASSIFICATION:
    raise UserError(f"config.data.source={config.data.source!r}: ensembles of runs are evaluated for "
                    f"classification only")
  members, variables = _load_teachers(setup, setup.mesh)
  num_classes = setup.train_source.num_classes

  @jax.jit
  def eval_step(variables, batch):
    outs = run_teachers(members, variables, batch["image"])
    log_p = jax.nn.logsumexp(jnp.stack([jax.nn.log_softmax(o.logits.astype(jnp.float32)) for o in outs]), axis=0)
    log_p = log_p - jnp.log(len(outs))
    mask = batch["mask"].astype(jnp.float32)
    wrong = (jnp.argmax(log_p, -1) != batch["label"]).astype(jnp.float32) * mask
    nll = -jnp.take_along_axis(log_p, batch["label"][:, None], -1)[:, 0]
    one = jnp.ones((), jnp.float32)
    return {"test/accuracy": (jnp.sum(mask) - jnp.sum(wrong), jnp.sum(mask)), "test/errors": (jnp.sum(wrong), one),
            "test/errors_per_class": (jax.ops.segment_sum(wrong, batch["label"], num_segments=num_classes), one),
            "test/ce": (jnp.sum(nll * mask), jnp.sum(mask))}

  totals: dict[str, Any] = {}
  for batch in kdata.eval_batches(setup.test_source, batch_size=config.data.eval_batch_size,
                                  mean=config.data.mean, std=config.data.std):
    totals = accumulate(totals, eval_step(variables, _global(batch, setup.mesh)))
  return reduce_metrics(totals)
