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
