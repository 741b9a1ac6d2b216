"""``train(config, workdir)``: validate everything, then train, evaluate, checkpoint and log.

All validation happens in :func:`prepare`, before anything is written, so bad
input never touches an existing workdir. What depends on the kind of data (image
classification or language modelling: model inputs, batches, metrics, summary) is
the task's (:mod:`kdlab.train.tasks`), picked from ``config.data.source``.
"""

from __future__ import annotations

import functools
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
from tqdm import tqdm

from kdlab import distributed
from kdlab.config import show
from kdlab import mesh as meshlib
from kdlab.errors import UserError
from kdlab.train import born_again, checkpoint, on_policy, optim, stopping, student_init, tasks
from kdlab.train import teachers as teacherlib
from kdlab.train.evaluate import eval_totals
from kdlab.files import write_json
from kdlab.train.logging import MetricsLog, Segments, WandbLog, read_metrics
from kdlab.train.prepare import check_workdir, eval_metric_names, prepare
from kdlab.train.state import TrainState, create_state, state_shardings
from kdlab.train.step import accumulate, make_eval_step, make_train_step, reduce_metrics


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, use_wandb: bool = True,
          progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the summary also written to ``summary.json``.

  With ``config.born_again.generations = K`` it trains a born-again chain instead (see
  :func:`kdlab.train.born_again.train_chain`).
  """
  if config.get("born_again") and config.born_again.get("generations") is not None:
    return born_again.train_chain(config, workdir, train_run, use_wandb=use_wandb, progress=progress)
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
  check_workdir(workdir, config_json)
  written = []

  def before_write() -> None:
    written.append(workdir)
    _write_config(workdir, config_json)

  summaries = _train_group(configs, [workdir / f"seed{c.seed}" for c in configs], use_wandb=use_wandb,
                           progress=progress, before_write=before_write)
  if not written and (workdir / "summary.json").exists():  # Every seed had finished: nothing is rewritten.
    return json.loads((workdir / "summary.json").read_text())
  summary: dict[str, Any] = {"seeds": [c.seed for c in configs], "runs": summaries}
  for field in tasks.for_source(config.data.source).headline_fields:
    values = [s.get(field) for s in summaries]
    if all(v is not None for v in values):
      summary[field] = float(np.mean(values))
  summary["wall_time_s"] = summaries[0]["wall_time_s"]
  if distributed.is_writer():
    write_json(workdir / "summary.json", summary)
  return summary


def _write_config(workdir: pathlib.Path, config_json: str) -> None:
  """Writes ``workdir/config.json``, unless it holds this config already (a resume leaves it as it was),
  or this is not the writing process (:func:`kdlab.distributed.is_writer`)."""
  path = workdir / "config.json"
  if not distributed.is_writer() or (path.exists() and path.read_text() == config_json):
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(config_json)


def _stack(trees: Sequence[Any]) -> Any:
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
  return [tree] if n == 1 else [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def _train_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[pathlib.Path], *,
                 use_wandb: bool, progress: bool, before_write: Any = None) -> list[dict[str, Any]]:
  """Trains runs that differ only in their seed; several are ``jax.vmap``-ed into one step.

  Once the workdirs are being written, SIGINT and SIGTERM stop the runs at the end of a step with a
  checkpoint there (:class:`kdlab.train.stopping.Interrupted`); a non-finite loss or state, or a loss
  above ``config.train.max_loss``, stops them before any checkpoint holds it
  (:class:`kdlab.train.stopping.Diverged`).
  """
  start = time.time()
  n = len(configs)
  setups = [prepare(c) for c in configs]
  setup, config = setups[0], configs[0]
  config_jsons = [c.to_json(indent=2, sort_keys=True) for c in configs]
  for workdir, config_json in zip(workdirs, config_jsons):
    check_workdir(workdir, config_json)
  loss_limit = max_loss(config)
  mesh = setup.mesh
  rules = config.get("sharding_rules") or ()
  teachers, teacher_vars = teacherlib.load_teachers(setup.teacher_specs, mesh, rules)
  keep = checkpoint_keep(config)
  wants_best = (config.get("checkpoint") or {}).get("best_metric") is not None
  best_metric, best_mode = best_checkpoint_metric(
      config, eval_metric_names(setup, teachers, teacher_vars) if wants_best else [])
  finished = _finished_summaries(workdirs, setup.total_steps)
  # Several processes: all have validated before any writes (bad input stops all with one line).
  distributed.agree(None)
  if finished is not None:  # Rerun of a finished run: nothing to train and nothing to rewrite.
    return finished
  writer = distributed.is_writer()
  distributed.set_failure_hint(f"restart every process with the same command; the run resumes from its last "
                               f"complete checkpoint in {_where(workdirs, None).replace('summary.json', 'checkpoints')}")

  # Everything is valid: from here on the workdirs are written, and a signal only stops the loop
  # at the end of a step (kdlab.train.stopping), so no write is cut short.
  # orbax logs a failed background save as a traceback; the failure reaches the loop as an exception.
  with stopping.Deferred() as signals, checkpoint.orbax_errors_silenced():
    if before_write is not None:
      before_write()
    for workdir, config_json in zip(workdirs, config_jsons):
      _write_config(workdir, config_json)
    tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
    graphdef, states = None, []
    for s, c in zip(setups, configs):
      graphdef, state = create_state(s.make_learner, tx, s.objective.init_state(), c.seed,
                                     ema=s.ema_decay is not None, mesh=mesh, param_shardings=s.param_shardings)
      states.append(state)
    task = setup.task
    read = grain.ReadOptions(num_threads=config.data.get("prefetch_threads", 0))
    rows = meshlib.process_rows(mesh, config.data.batch_size)  # This process's share of every batch.
    data_iters = [iter(task.train_dataset(s.train_source, c.data, c.seed, rows=rows).to_iter_dataset(read))
                  for s, c in zip(setups, configs)]
    ckpts = [checkpoint.Checkpointer(w / "checkpoints", max_to_keep=keep) for w in workdirs]
    best_ckpts = ([checkpoint.Checkpointer(w / "best_checkpoint", max_to_keep=1) for w in workdirs]
                  if best_metric else [])
    kept_best = [_best(w, best_metric, best_mode) if best_metric else None for w in workdirs]
    latest = [c.latest_step() for c in ckpts]
    if any(step is not None for step in latest):
      if any(step is None for step in latest):
        raise UserError(f"{workdirs[0].parent}: some seeds have checkpoints and others not; use a new workdir")
      states = _restore(ckpts, states, data_iters, min(latest))
    else:  # A fresh run: the student may start from a pretrained directory or its teacher's layers.
      states = [student_init.apply(s.student_init, st, s.learner.student, s.param_shardings["student"], teacher_vars)
                for s, st in zip(setups, states)]
    state_sharding = state_shardings(states[0], mesh, setup.param_shardings, n)
    state = jax.device_put(_stack(states), state_sharding)
    start_step = int(states[0].step)

    # Eval-only teachers (and all of them, with a teacher cache) are run by the eval step alone.
    step_teachers = [teachers[i] for i in setup.objective_teachers]
    step_teacher_vars = [teacher_vars[i] for i in setup.objective_teachers]
    train_step = make_jitted_train_step(setup, graphdef, tx, step_teachers, step_teacher_vars, state_sharding, n)
    eval_fn = make_eval_step(graphdef, teachers, task, setup.student_vocab)
    if n > 1:
      eval_fn = jax.vmap(eval_fn, in_axes=(0, None, None, None))
    # Replicated outputs: every process reads the same global sums (several processes: no host holds all shards).
    eval_step = jax.jit(eval_fn, out_shardings=meshlib.replicated(mesh))
    finite = jax.jit(functools.partial(_finite_per_run, n=n), out_shardings=meshlib.replicated(mesh))
    # config.on_policy: some batches become the student's own samples (kdlab.train.on_policy).
    policy = on_policy.build(configs, setup, graphdef, meshlib.batch_sharding(mesh, leading_axes=1 if n > 1 else 0))
    if policy is not None:
      train_step = policy.wrap(train_step)
    logs = [MetricsLog(w, start_step, enabled=writer) for w in workdirs]
    segments = [Segments(w, start_step, start, enabled=writer) for w in workdirs]
    wandb_logs = [WandbLog(w, json.loads(j), enabled=use_wandb and writer, project=c.get("wandb_project", "kdlab"),
                           group=c.get("wandb_group") or None, tags=tuple(c.get("wandb_tags", ())))
                  for w, j, c in zip(workdirs, config_jsons, configs)]

    def evaluate_all() -> list[dict[str, Any]]:
      totals = eval_totals(lambda batch: eval_step(state, teacher_vars, batch, offset), setup)
      return [task.finalize(reduce_metrics(t)) for t in _unstack(totals, n)]

    def diverged(i: int, step: int, what: str) -> stopping.Diverged:
      for ckpt in [*ckpts, *best_ckpts]:  # The last good checkpoint is on disk before the message names it.
        ckpt.wait()
      return stopping.Diverged(_diverged_message(workdirs[i], step, what, ckpts[i].latest_step()))

    def check_finite(step: int) -> None:
      """Before any save: a checkpoint never holds a nan or inf."""
      for i, ok in enumerate(np.asarray(finite(state)).reshape(-1)):
        if not ok:
          raise diverged(i, step, "the train state (parameters or optimizer state) holds nan or inf")

    offset = jnp.zeros((setup.num_outputs,), jnp.float32)
    eval_every = max(1, int(round(config.train.eval_every_epochs * setup.steps_per_epoch)))
    ckpt_every = max(1, int(round(config.train.checkpoint_every_epochs * setup.steps_per_epoch)))
    log_every = max(1, min(config.train.log_every_steps, setup.steps_per_epoch))
    totals: dict[str, Any] = {}
    best = [_best(w, task.best_key, "max" if task.better(1.0, 0.0) else "min") for w in workdirs]
    steps_timed, time_in_steps = 0, 0.0
    final = None
    window_start = start_step + 1  # The first step the next logged averages cover.
    bar = tqdm(total=setup.total_steps, initial=start_step, disable=not progress or not writer, desc=workdirs[0].name,
               mininterval=2.0, dynamic_ncols=True)
    try:
      for step in range(start_step + 1, setup.total_steps + 1):
        batches = [next(it) for it in data_iters]
        if setup.cache is not None:  # The teacher's stored outputs for these sequences (config.teacher_cache).
          batches = [{**b, **setup.cache.lookup(b["index"])} for b in batches]
        batch = meshlib.global_batch(batches[0] if n == 1 else {k: np.stack([b[k] for b in batches]) for k in batches[0]},
                        mesh, stacked=n > 1)
        t0 = time.time()
        state, metrics = train_step(state, step_teacher_vars, batch)
        totals = accumulate(totals, metrics)
        # Read once: a signal arriving later in this step stops the next one; every process stops at the same step.
        stop = distributed.first_signal(signals.received)
        save_now = step % ckpt_every == 0 or step == setup.total_steps or stop is not None
        # Logging at every checkpoint too keeps the averaging windows of a resumed run identical.
        if step % log_every == 0 or save_now:
          window = [reduce_metrics(t) for t in _unstack(totals, n)]
          for i, values in enumerate(window):
            problem = _loss_problem(values["loss"], loss_limit)
            if problem:
              over = f"step {step}" if window_start == step else f"steps {window_start}-{step}"
              raise diverged(i, step, f"{problem} (the mean over {over})")
          for i, values in enumerate(window):
            values["epoch"] = step / setup.steps_per_epoch
            logs[i].write(step, values)
            wandb_logs[i].write(step, values)
          totals, window_start = {}, step + 1
          bar.set_postfix(loss=f"{window[-1]['loss']:.4f}", refresh=False)
        if step > start_step + 1:  # The first step compiles; leave it out of the speed figure.
          jax.block_until_ready(state.step)
          steps_timed += 1
          time_in_steps += time.time() - t0
        if step % eval_every == 0 or step == setup.total_steps:
          final = evaluate_all()
          for i, values in enumerate(final):
            if best[i] is None or task.better(values[task.best_key], best[i]):
              best[i] = values[task.best_key]
            if best_metric and _improves(values[best_metric], kept_best[i], best_mode):
              check_finite(step)
              kept_best[i] = values[best_metric]
              best_ckpts[i].save(step, _unstack(state, n)[i], data_iters[i].get_state())
              if writer:
                write_json(workdirs[i] / "best_checkpoint" / "best.json",
                           {"step": step, "metric": best_metric, "mode": best_mode, "value": kept_best[i]})
            logs[i].write(step, {**values, "epoch": step / setup.steps_per_epoch})
            wandb_logs[i].write(step, values)
        if save_now:
          check_finite(step)
          for ckpt, s, it in zip(ckpts, _unstack(state, n), data_iters):
            ckpt.save(step, s, it.get_state())
          for segment in segments:
            segment.update(step, steps_timed, time_in_steps)
        bar.update(1)
        if stop is not None and step < setup.total_steps:
          raise stopping.Interrupted(stop, f"interrupted ({stopping.signal_name(stop)}) at step {step}; saved "
                                           f"{_where(workdirs, step)}; rerun the same command to resume")
      bar.close()
    except BaseException:  # Interrupted or failed: the saves in flight complete before the exit.
      bar.close()
      for ckpt in [*ckpts, *best_ckpts]:
        ckpt.close()
      raise

    for ckpt in [*ckpts, *best_ckpts]:  # A summary.json means the run's last checkpoint is on disk.
      ckpt.wait()
    summaries = []
    for i, values in enumerate(final if final is not None else evaluate_all()):
      segments[i].update(setup.total_steps, steps_timed, time_in_steps)
      summary = {
          **task.summary(values, best[i], setup.test_source, setup.total_steps),
          # Over every process that trained the run (segments.json); each run advanced this many steps per
          # second (all n runs together: n times as many).
          **segments[i].totals(),
          "runs_in_step": n,
      }
      if writer:
        write_json(workdirs[i] / "summary.json", summary)
      wandb_logs[i].write(setup.total_steps, {f"summary/{k}": v for k, v in summary.items()
                                              if isinstance(v, (int, float))})
      wandb_logs[i].close()
      ckpts[i].close()
      if best_ckpts:
        best_ckpts[i].close()
      summaries.append(summary)
  if signals.received is not None:  # During the last step or the summary: the run finished all the same.
    raise stopping.Interrupted(signals.received, f"interrupted ({stopping.signal_name(signals.received)}) after "
                                                 f"the last step; the run finished: summary in "
                                                 f"{_where(workdirs, None)}")
  return summaries


def _restore(ckpts: Sequence[checkpoint.Checkpointer], states: list[TrainState], data_iters: Sequence[Any],
             at_most: int) -> list[TrainState]:
  """Each run's newest checkpoint that loads, at most step ``at_most`` and the same step for every run
  (seeds save together; a kill between their saves leaves one behind); the data iterators are set
  to their saved positions. Damaged checkpoints are moved aside (:meth:`Checkpointer.restore_newest`)."""
  restored: list[Any] = [None] * len(ckpts)
  while True:
    for i, ckpt in enumerate(ckpts):
      if restored[i] is None or restored[i][2] > at_most:
        restored[i] = ckpt.restore_newest(states[i], at_most=at_most)
        if restored[i] is None:
          raise UserError(f"{ckpt.directory}: no checkpoint at or before step {at_most} while the other seeds' "
                          f"are there; use a new workdir")
    steps = {r[2] for r in restored}
    if len(steps) == 1:
      break
    at_most = min(steps)
  for it, (_, data_state, _) in zip(data_iters, restored):
    it.set_state(data_state)
  return [r[0] for r in restored]


def _finite_per_run(state: TrainState, n: int) -> jax.Array:
  """Whether every float in ``state`` is finite: a bool, or ``[n]`` bools for ``n`` stacked runs."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if n == 1:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]), axis=0)


def _loss_problem(loss: float, limit: float | None) -> str | None:
  """What is wrong with a logged mean ``loss`` (non-finite, or above ``limit``), or None."""
  if not math.isfinite(loss):
    return f"the loss became {loss}"
  if limit is not None and loss > limit:
    return f"the loss {loss:.4g} passed config.train.max_loss={limit:g}"
  return None


def _diverged_message(workdir: pathlib.Path, step: int, what: str, last: int | None) -> str:
  """One line: what diverged where, the last good checkpoint, and the options that help."""
  fix = ("a lower --config.optimizer.learning_rate (or a warm-up, --config.optimizer.warmup_epochs); gradient "
         "clipping (--config.optimizer.clip_grad_norm=1.0) needs a new workdir; --config.train.max_loss=X stops a "
         "run as soon as its loss passes X")
  if last is None:
    return f"{workdir}: {what} at step {step}; no checkpoint was saved before it; rerun the same command with {fix}"
  return (f"{workdir}: {what} at step {step}; the last good checkpoint is {workdir / 'checkpoints' / str(last)}; "
          f"to continue from it, rerun the same command with {fix}")


def _where(workdirs: Sequence[pathlib.Path], step: int | None) -> str:
  """``RUN/checkpoints/<step>`` (``RUN/summary.json`` if ``step`` is None), the seeds of vmapped runs in braces."""
  tail = "summary.json" if step is None else f"checkpoints/{step}"
  if len(workdirs) == 1:
    return str(workdirs[0] / tail)
  return f"{workdirs[0].parent}/{{{','.join(w.name for w in workdirs)}}}/{tail}"


def make_jitted_train_step(setup: Any, graphdef: Any, tx: Any, teachers: Sequence[Any], teacher_vars: Sequence[Any],
                           state_sharding: Any, n: int = 1) -> Any:
  """The jitted train step of ``setup`` (``n`` vmapped seeds when > 1): its inputs and outputs keep
  their shardings (the state's, each teacher variable's as given, the batch split over the data
  axes) and the state is donated (updated in place)."""
  config = setup.config
  step_fn = make_train_step(graphdef, setup.objective, tx, teachers, setup.ema_decay,
                            term_grad_norms=bool(config.train.get("term_grad_norms", False)),
                            connector_warmup_steps=config.get("connector_warmup_steps", 0),
                            task=setup.task, student_taps=setup.student_taps,
                            lr_schedule=optim.learning_rate(config.optimizer, setup.steps_per_epoch, setup.total_steps),
                            microbatches=config.train.get("microbatches", 1), student_vocab=setup.student_vocab,
                            token_normalization=config.train.get("token_normalization", "sequence"))
  if n > 1:
    step_fn = jax.vmap(step_fn, in_axes=(0, None, 0))
  teacher_sharding = jax.tree.map(lambda x: x.sharding, list(teacher_vars))
  batch_sharding = meshlib.batch_sharding(setup.mesh, leading_axes=1 if n > 1 else 0)
  return jax.jit(step_fn, in_shardings=(state_sharding, teacher_sharding, batch_sharding),
                 out_shardings=(state_sharding, meshlib.replicated(setup.mesh)), donate_argnums=(0,))


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


def _best(workdir: pathlib.Path, metric: str, mode: str) -> float | None:
  """The best ``metric`` (``mode`` max or min) among the evaluations already logged in ``workdir`` (a resumed run)."""
  best = None
  for m in read_metrics(workdir):
    value = m.get(metric)
    if value is not None and _improves(value, best, mode):
      best = value
  return best


def _improves(value: float, best: float | None, mode: str) -> bool:
  return best is None or (value > best if mode == "max" else value < best)


def max_loss(config: ml_collections.ConfigDict) -> float | None:
  """``config.train.max_loss`` (None: off): a logged mean train loss above it stops the run as a divergence
  (its range is checked with every other field's, :func:`kdlab.train.ranges.check`)."""
  limit = config.train.get("max_loss")
  return None if limit is None else float(limit)


def checkpoint_keep(config: ml_collections.ConfigDict) -> int:
  """``config.checkpoint.keep``: how many of the latest checkpoints a run keeps (default 2; range checked by
  :func:`kdlab.train.ranges.check`)."""
  return int((config.get("checkpoint") or {}).get("keep", 2))


def best_checkpoint_metric(config: ml_collections.ConfigDict, names: Sequence[str]) -> tuple[str | None, str]:
  """``config.checkpoint.best_metric`` (one of the eval metric ``names``, e.g. ``test/accuracy``; None: no
  best checkpoint) and ``best_mode`` (``max`` or ``min``; default ``max`` for accuracies, else ``min``;
  its values checked by :func:`kdlab.train.ranges.check`)."""
  cfg = config.get("checkpoint") or {}
  metric = cfg.get("best_metric")
  if metric is None:
    return None, "max"
  if metric not in names:
    raise UserError(f"config.checkpoint.best_metric={show(metric)}: not an eval metric of this run; use one of "
                    f"{', '.join(sorted(names))}")
  return metric, cfg.get("best_mode") or ("max" if "accuracy" in metric else "min")


