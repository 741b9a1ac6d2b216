"""Evaluation: a student's metrics over the eval split, a finished run's checkpoint, an ensemble of runs.

One loop (:func:`eval_totals`) feeds every eval batch, as global arrays on the mesh (each process
reading its rows), to a jitted eval step and sums its ``(sum, count)`` metrics.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdlab import mesh as meshlib
from kdlab.errors import UserError
from kdlab.train import checkpoint, optim, tasks
from kdlab.train import teachers as teacherlib
from kdlab.train.prepare import Setup, prepare
from kdlab.train.state import TrainState, create_state
from kdlab.train.step import accumulate, make_eval_step, reduce_metrics, run_teachers


def eval_totals(step: Callable[[dict[str, jax.Array]], Any], setup: Setup) -> dict[str, Any]:
  """The summed ``(sum, count)`` metrics of ``step(batch)`` over every eval batch of ``setup``."""
  totals: dict[str, Any] = {}
  rows = meshlib.process_rows(setup.mesh, setup.config.data.eval_batch_size)  # This process's share.
  for batch in setup.task.eval_batches(setup.test_source, setup.config.data, rows=rows):
    totals = accumulate(totals, step(meshlib.global_batch(batch, setup.mesh)))
  return totals


def evaluate(eval_step, state: TrainState, teacher_vars: Sequence[Any], setup: Setup,
             logit_offset: np.ndarray | None = None) -> dict[str, Any]:
  """Student metrics over the whole eval split of ``setup``."""
  offset = jnp.zeros((setup.num_outputs,), jnp.float32) if logit_offset is None else jnp.asarray(logit_offset)
  totals = eval_totals(lambda batch: eval_step(state, teacher_vars, batch, offset), setup)
  return setup.task.finalize(reduce_metrics(totals))


def evaluate_run(workdir: str | pathlib.Path, *, logit_offset: np.ndarray | None = None) -> dict[str, Any]:
  """Eval metrics of a finished run's last checkpoint, optionally with ``logit_offset [C]`` added."""
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  setup = prepare(config)
  teachers, teacher_vars = teacherlib.load_teachers(setup.teacher_specs, setup.mesh,
                                                    config.get("sharding_rules") or ())
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, state = create_state(setup.make_learner, tx, setup.objective.init_state(), config.seed,
                                 ema=setup.ema_decay is not None, mesh=setup.mesh,
                                 param_shardings=setup.param_shardings)
  state, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore(state)
  eval_step = jax.jit(make_eval_step(graphdef, teachers, setup.task, setup.student_vocab))
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
  members, variables = teacherlib.load_teachers(setup.teacher_specs, setup.mesh)
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

  return reduce_metrics(eval_totals(lambda batch: eval_step(variables, batch), setup))
