"""Builds every variant of configs/cifar100_crd.py and trains each 2 steps on mock CIFAR-100.

  nice python paper_repro/crd2019/check_all.py | tee paper_repro/crd2019/check_all.txt

The 6 teacher variants train first (2 steps, batch 8, ``tfds.testing.mock_data`` with 16 random
32x32 images of 100 classes); every TEACHER-STUDENT-METHOD cell of the 13 pairs x 16 methods then
trains 2 steps (``,mock``: real model sizes) from a teacher with random weights whose batch-norm
statistics were calibrated on the mock images (train-mode forward passes, no gradient step), so
that its features have a trained network's scale: an untrained deep ResNet's eval-mode features
reach 1e4 (resnet56) to 1e8 (resnet110) and a teacher trained for 2 steps is no better, which
sends FT, FSP and VID to inf in 2 steps. One line per cell (ok,
fail with the error's first line, or n/a where the benchmark has no such cell and the config
refuses it), then a summary. ``--pairs`` / ``--methods`` restrict the product; ``--resume FILE``
keeps the ok / n/a lines of an interrupted run's output and runs only the other cells. By default XLA
compiles with ``--xla_backend_optimization_level=0`` (a smoke test: compile time dominates;
``--full-compile`` keeps XLA's defaults).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = HERE.parent.parent / "configs" / "cifar100_crd.py"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", default="", help="comma-separated TEACHER-STUDENT pairs (default: all 13)")
  parser.add_argument("--methods", default="", help="comma-separated methods (default: all 16)")
  parser.add_argument("--full-compile", action="store_true", help="keep XLA's default optimization level")
  parser.add_argument("--label", default="", help="a note for the header (e.g. which code was checked)")
  parser.add_argument("--resume", default=None, help="an interrupted run's output: keep its ok / n/a cells")
  args = parser.parse_args(argv)
  if not args.full_compile:  # Before jax is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  os.environ.setdefault("WANDB_MODE", "disabled")

  import jax
  import tensorflow_datasets as tfds
  from kdlab.config import load, load_python_file
  from kdlab.errors import UserError
  from kdlab.train.loop import train

  crd = load_python_file(CONFIG, "check_all")
  pairs = [tuple(p.split("-")) for p in args.pairs.split(",") if p] or list(crd.PAIRS)
  methods = [m for m in args.methods.split(",") if m] or list(crd.METHODS)
  unknown = [p for p in pairs if p not in crd.PAIRS] + [m for m in methods if m not in crd.METHODS]
  if unknown:
    parser.error(f"unknown pairs or methods: {unknown}")
  teachers = sorted({t for t, _ in pairs})
  started = time.time()
  load_start = os.getloadavg()[0]
  print(f"# check_all: {len(teachers)} teachers + {len(pairs)} pairs x {len(methods)} methods, 2 steps each on "
        f"mock CIFAR-100 (16 images, batch 8)", flush=True)
  print(f"# {os.cpu_count()} CPUs, load average {load_start:.1f} at start; jax {jax.__version__}; "
        f"kdlab {_revision()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  if args.label:
    print(f"# {args.label}", flush=True)
  counts = {"ok": 0, "fail": 0, "n/a": 0}
  kept = _kept_cells(args.resume) if args.resume else {}
  if args.resume:
    earlier = [l for l in pathlib.Path(args.resume).read_text().splitlines() if l.startswith("# ") and "summary" not in l]
    print(f"# resumed from an interrupted run: {len(kept)} ok / n/a cells kept from it; its header was:", flush=True)
    for line in earlier:
      print(f"#   {line[2:]}", flush=True)

  def report(status: str, name: str, seconds: float, detail: str = "") -> None:
    counts[status] += 1
    print(f"{status:5s} {seconds:7.1f} s  {name}{'  ' + detail if detail else ''}", flush=True)

  def keep(name: str) -> bool:
    """Prints an interrupted run's line for cell ``name`` if it has one."""
    if name not in kept:
      return False
    counts[kept[name].split()[0]] += 1
    print(kept[name], flush=True)
    return True

  with tempfile.TemporaryDirectory(prefix="kdlab_check_all_") as tmp, \
      tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    root = pathlib.Path(tmp)
    teacher_dirs = {}
    for teacher in teachers:
      name, t0 = f"teacher-{teacher}", time.time()
      cells = [f"{teacher}-{s}-{m}" for t, s in pairs if t == teacher for m in methods]
      if keep(name):
        if any(cell not in kept for cell in cells):
          teacher_dirs[teacher] = calibrated_teacher(teacher, root / f"calibrated-{teacher}", crd.MEAN, crd.STD)
        continue
      try:
        summary = train(load(f"{CONFIG}:{name},mock"), root / name, use_wandb=False, progress=False)
        shutil.rmtree(root / name)
        teacher_dirs[teacher] = calibrated_teacher(teacher, root / f"calibrated-{teacher}", crd.MEAN, crd.STD)
        report("ok", name, time.time() - t0, f"steps {summary['steps']}; calibrated random teacher saved")
      except Exception as e:  # Report and go on: the point is the whole list.
        report("fail", name, time.time() - t0, _first_line(e))
    for teacher, student in pairs:
      for method in methods:
        name, t0 = f"{teacher}-{student}-{method}", time.time()
        if keep(name):
          continue
        if not crd.applicable(teacher, student, method):
          try:
            load(f"{CONFIG}:{name},mock")
            report("fail", name, time.time() - t0, "the config accepts a cell the benchmark does not have")
          except UserError as e:
            report("n/a", name, time.time() - t0, f"refused: {_first_line(e)}")
          continue
        if teacher not in teacher_dirs:
          report("fail", name, 0.0, f"teacher-{teacher} failed")
          continue
        workdir = root / name
        try:
          config = load(f"{CONFIG}:{name},mock,teacher={teacher_dirs[teacher]}")
          summary = train(config, workdir, use_wandb=False, progress=False)
          losses = _losses(workdir)
          report("ok", name, time.time() - t0, f"steps {summary['steps']}, loss {losses}")
        except Exception as e:
          report("fail", name, time.time() - t0, _first_line(e))
        finally:
          shutil.rmtree(workdir, ignore_errors=True)
  total = time.time() - started
  resumed = f" ({len(kept)} cells kept from the interrupted run, not counted in the wall time)" if kept else ""
  print(f"# summary: {counts['ok']} ok, {counts['fail']} fail, {counts['n/a']} n/a (no such cell in the benchmark); "
        f"{total:.0f} s wall{resumed}; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        flush=True)
  return 1 if counts["fail"] else 0


def calibrated_teacher(name: str, root: pathlib.Path, mean, std, passes: int = 40) -> str:
  """Saves model ``name`` with random weights and batch-norm statistics estimated on the (mock)
  CIFAR-100 training images as a finished run (``root/checkpoints`` + config.json); returns the
  checkpoints folder."""
  import json
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from kdlab import data as kdata, models
  from kdlab.data.pipeline import Normalize, gather
  from kdlab.train.checkpoint import Checkpointer
  from kdlab.train.state import Learner, init_state

  source = kdata.load("tfds:cifar100", "train")
  images = Normalize(mean, std)(gather(source, np.arange(len(source))))["image"]
  model = models.create(name, num_classes=100)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m(x, train=True)  # Updates the running statistics (momentum 0.9): after 40 passes they are the batch's.
    return nnx.state(m)

  for _ in range(passes):
    state = forward(state, images)
  nnx.update(model, state)
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps({"model": {"name": name, "num_classes": 100}}))
  _, train_state = init_state(Learner(model, {}), optax.identity(), {}, 0)
  ckpt = Checkpointer(root / "checkpoints")
  ckpt.save(1, train_state, {})
  ckpt.close()
  return str(root / "checkpoints")


def _kept_cells(path: str) -> dict[str, str]:
  """Cell name -> its line, for the ok and n/a lines of an earlier output of this script."""
  kept = {}
  for line in pathlib.Path(path).read_text().splitlines():
    parts = line.split()
    if len(parts) >= 4 and parts[0] in ("ok", "n/a") and parts[2] == "s":
      kept[parts[3]] = line
  return kept


def _revision() -> str:
  """The git commit of the checkout, "+ changes" when the working tree differs from it."""
  import subprocess
  root = CONFIG.parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "(not a git checkout)"
  return f"{commit}{' + changes' if dirty else ''}"


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def _losses(workdir: pathlib.Path) -> str:
  """The logged train loss of each step, e.g. "4.61 -> 4.58"."""
  import json
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
  values = [f"{r['loss']:.3g}" for r in rows if "loss" in r]
  return " -> ".join(values)


if __name__ == "__main__":
  sys.exit(main())
