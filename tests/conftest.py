"""Shared test set-up: CPU, no W&B, and helpers to run kdlab in a child process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent
HINTON = str(ROOT / "configs" / "hinton_mnist.py")


def _hypothesis_profiles() -> None:
  """tests/test_fuzz.py's settings: ``ci`` (loaded here: a fixed seed, sized for CI) and ``long``
  (``pytest --hypothesis-profile=long``). Registered here because the plugin loads a profile before
  test modules are imported."""
  from hypothesis import HealthCheck, settings
  common = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
  settings.register_profile("ci", max_examples=300, derandomize=True, **common)
  settings.register_profile("long", max_examples=3000, derandomize=False, **common)
  settings.load_profile("ci")


_hypothesis_profiles()


def kdlab_cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "kdlab", *args]


def run_child(args: list[str], *, devices: int = 1, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``args`` in a fresh process with ``devices`` simulated CPU devices."""
  proc = subprocess.run(args, env=child_env(devices), capture_output=True, text=True, cwd=ROOT, **kwargs)
  if check and proc.returncode != 0:
    raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def child_env(devices: int = 1) -> dict[str, str]:
  """The environment of a child process: ``devices`` simulated CPU devices, no W&B, kdlab importable.

  ``PYTHONPATH`` keeps what it had after the repository root (a feature-off plugin puts its
  ``sitecustomize`` there, so the child runs with the feature off too).
  """
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", WANDB_MODE="disabled",
              JAX_PLATFORMS="cpu", PYTHONPATH=path)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def tree_snapshot(root: pathlib.Path) -> dict[str, tuple[int, bytes]]:
  """Every file under ``root`` with its mtime and contents (to prove nothing changed)."""
  return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(root.rglob("*")) if p.is_file()}


def count_train_steps(monkeypatch) -> list[int]:
  """Records ``state.step`` at the start of every train step ``kdlab.train.loop`` executes in this process.

  Call ``jax.effects_barrier()`` before reading the list (the steps record it from the device).
  """
  import jax
  from kdlab.train import loop
  steps: list[int] = []
  make = loop.make_train_step

  def counting_make_train_step(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, teacher_variables, batch):
      jax.debug.callback(lambda s: steps.append(int(s)), state.step)
      return step_fn(state, teacher_variables, batch)

    return step

  monkeypatch.setattr(loop, "make_train_step", counting_make_train_step)
  return steps


def kill_after_first_checkpoint(monkeypatch, run) -> tuple[int, list[dict]]:
  """Calls ``run()`` (one training run) and kills it (``KeyboardInterrupt``) right after the first train
  line it logs past its first checkpoint. Returns that checkpoint's step and every batch the run drew."""
  import pytest
  from grain._src.python.dataset.transformations.prefetch import PrefetchDatasetIterator
  from kdlab.train import checkpoint, logging
  saved, batches = [], []
  save, write, draw = checkpoint.Checkpointer.save, logging.MetricsLog.write, PrefetchDatasetIterator.__next__

  def save_and_note(self, step, *args):
    save(self, step, *args)
    saved.append(step)

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if saved and step > saved[0] and "loss" in metrics:
      raise KeyboardInterrupt

  def draw_and_note(self):
    batches.append(draw(self))
    return batches[-1]

  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, "save", save_and_note)
    m.setattr(logging.MetricsLog, "write", write_then_die)
    m.setattr(PrefetchDatasetIterator, "__next__", draw_and_note)
    with pytest.raises(KeyboardInterrupt):
      run()
  return saved[0], batches


def watch_resume(monkeypatch) -> dict[str, list]:
  """What the next run in this process does: ``steps`` (see :func:`count_train_steps`), ``restored``
  (``(checkpoint folder, step, state_arrays(state), data state)`` per restore) and ``batches`` (the train
  batches drawn)."""
  from grain._src.python.dataset.transformations.prefetch import PrefetchDatasetIterator
  from kdlab.train import checkpoint
  seen: dict[str, list] = {"steps": count_train_steps(monkeypatch), "restored": [], "batches": []}
  restore, draw = checkpoint.Checkpointer.restore, PrefetchDatasetIterator.__next__

  def restore_and_note(self, like, step=None):
    state, data_state = restore(self, like, step)
    seen["restored"].append((self.directory, step, state_arrays(state), data_state))  # Copies: steps donate it.
    return state, data_state

  def draw_and_note(self):
    seen["batches"].append(draw(self))
    return seen["batches"][-1]

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore_and_note)
  monkeypatch.setattr(PrefetchDatasetIterator, "__next__", draw_and_note)
  return seen


def state_arrays(state) -> dict[tuple[str, ...], "np.ndarray"]:
  """A ``TrainState`` (or a checkpoint's raw tree) as numpy copies of its leaves by path (PRNG keys as data)."""
  import dataclasses
  import re
  import jax
  import numpy as np
  from kdlab.train.state import keys_to_data
  tree = keys_to_data(dataclasses.asdict(state) if dataclasses.is_dataclass(state) else state)
  return {tuple(re.findall(r"\w+", jax.tree_util.keystr(k))): np.array(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_contents(directory: pathlib.Path, step: int) -> tuple[dict, dict]:
  """What ``directory/<step>`` stores, read with orbax alone: :func:`state_arrays` and the data state."""
  import orbax.checkpoint as ocp
  arrays = state_arrays(ocp.StandardCheckpointer().restore(directory / str(step) / "state"))
  return arrays, json.loads((directory / str(step) / "data" / "metadata").read_text())


def assert_same_arrays(actual: dict, expected: dict) -> None:
  """Two :func:`state_arrays` results hold the same paths and bit-identical arrays."""
  import numpy as np
  assert sorted(actual) == sorted(expected) and len(expected) > 3
  for path, array in expected.items():
    np.testing.assert_array_equal(actual[path], array, err_msg=str(path))


def random_gpt_run(root: pathlib.Path, *, sharpen: float = 50.0, seed: int = 3, **model) -> pathlib.Path:
  """A finished-run folder (``config.json``, ``checkpoints/``, ``summary.json``) of a randomly initialized 1-layer gpt
  (vocab 256, ``max_len`` 32, as ``lm_pysrc.py`` quick; ``model`` overrides these), its logits scaled up
  by ``sharpen`` so that they are peaked (a teacher worth distilling; no training needed). Returns the
  checkpoints folder."""
  import optax
  from kdlab import models
  from kdlab.train.checkpoint import Checkpointer
  from kdlab.train.state import Learner, init_state
  spec = {**dict(name="gpt", vocab_size=256, d_model=32, num_layers=1, num_heads=2, max_len=32), **model}
  model = models.create(**spec, seed=seed)
  model.embed.embedding[...] = model.embed.embedding[...] * sharpen
  _, state = init_state(Learner(model, {}), optax.sgd(0.1), {}, seed)
  ckpt = Checkpointer(root / "checkpoints")
  ckpt.save(1, state, {})
  ckpt.close()
  (root / "config.json").write_text(json.dumps({"model": spec}))
  mark_finished(root)
  return root / "checkpoints"


def mark_finished(run: pathlib.Path) -> None:
  """Makes the run folder ``run`` count as finished (a ``summary.json``): teachers must come from finished runs."""
  (run / "summary.json").write_text(json.dumps({"steps": 1}))
