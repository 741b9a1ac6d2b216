"""``python tests/fault_child.py ARGS...``: ``kdlab ARGS...`` with faults and a timeline, for the reliability tests.

Set by environment variables (all optional):
  KDLAB_MARKS          file to append ``<time> <event>`` lines to: ``start``, ``prepare``, ``step`` (each train
                       step the loop executes), ``commit-start NAME`` / ``commit-end NAME`` (orbax renaming a
                       finished temporary folder: the items ``state``, ``data``, then the step's folder),
                       ``restored STEP``.
  KDLAB_STEP_SLEEP     seconds each train step takes longer (the window to send a signal in).
  KDLAB_COMMIT_SLEEP   seconds each orbax commit takes longer, in its background thread (a save in flight).
  KDLAB_START_SLEEP    seconds start-up takes longer, before the config is validated.
  KDLAB_POISON_AFTER   after the train step that reaches this step, the parameters become nan.
"""

import asyncio
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity

from kdlab import cli
from kdlab.train import checkpoint, loop

_marks = open(os.environ["KDLAB_MARKS"], "a", buffering=1) if os.environ.get("KDLAB_MARKS") else None


def mark(event: str) -> None:
  if _marks is not None:
    _marks.write(f"{time.time():.6f} {event}\n")


def _seconds(name: str) -> float:
  return float(os.environ.get(name, "0"))


accumulate, restore, prepare = loop.accumulate, checkpoint.Checkpointer.restore, loop.prepare
make_step, finalize = loop.make_jitted_train_step, atomicity.AtomicRenameTemporaryPath.finalize


def slow_accumulate(totals, metrics):
  mark("step")
  time.sleep(_seconds("KDLAB_STEP_SLEEP"))
  return accumulate(totals, metrics)


async def slow_finalize(self):
  name = self.get_final().name
  mark(f"commit-start {name}")
  await asyncio.sleep(_seconds("KDLAB_COMMIT_SLEEP"))
  await finalize(self)
  mark(f"commit-end {name}")


def noted_restore(self, like, step=None):
  out = restore(self, like, step)
  mark(f"restored {step}")
  return out


def slow_prepare(config):
  mark("prepare")
  time.sleep(_seconds("KDLAB_START_SLEEP"))
  return prepare(config)


def poisoning_step(*args, **kwargs):
  step_fn = make_step(*args, **kwargs)
  after = int(os.environ.get("KDLAB_POISON_AFTER", "-1"))
  if after < 0:
    return step_fn

  def step(state, teacher_vars, batch):
    state, metrics = step_fn(state, teacher_vars, batch)
    if int(state.step) == after:
      state = dataclasses.replace(state, params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    return state, metrics

  return step


loop.accumulate, loop.prepare, loop.make_jitted_train_step = slow_accumulate, slow_prepare, poisoning_step
checkpoint.Checkpointer.restore = noted_restore
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
mark("start")
sys.exit(cli.main(sys.argv[1:]))
