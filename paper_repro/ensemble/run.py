"""Ensemble distillation (Hinton et al. 2015): 5 teachers with different seeds distilled into one student.

  python paper_repro/ensemble/run.py --teachers 5 --seeds 3 --workdir runs/ensemble

Trains teachers t0..t4 (configs/hinton_mnist.py:teacher, seeds 0..4), evaluates them and their
ensemble (mean of probabilities), then per seed the 2x800 student on hard labels, distilled from
t0 alone, and distilled from the ensemble of all teachers (mean of T=20 probabilities). Writes
results.md: test accuracy and errors, mean +/- std over seeds, and training speed by number of
teachers. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from kdlab.config import load
from kdlab.repro import mean_std, run_cached
from kdlab.train.evaluate import evaluate_ensemble

HERE = pathlib.Path(__file__).parent
CONFIGS = HERE.parent.parent / "configs"

PAPER = ("Hinton et al. 2015 distilled an ensemble into a single model on speech recognition: 10-model "
         "ensemble 61.1% frame accuracy / 10.7% WER, baseline 58.9% / 10.9%, distilled single model "
         "60.8% / 10.7% (quoted): the distilled model keeps most of the ensemble's gain.")


def step_memory(config) -> dict[str, float]:
  """Compiled train-step memory (MiB, from XLA's memory analysis) and measured ms per step."""
  import jax
  import jax.numpy as jnp
  from kdlab import data as kdata
  from kdlab.train import optim
  from kdlab.train.teachers import load_teachers
  from kdlab.train.prepare import prepare
  from kdlab.train.state import init_state
  from kdlab.train.step import make_train_step
  setup = prepare(config)
  teachers, teacher_vars = load_teachers(setup.teacher_specs, setup.mesh)
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  graphdef, state = init_state(setup.learner, tx, setup.objective.init_state(), config.seed)
  batch = {k: jnp.asarray(v) for k, v in kdata.train_dataset(setup.train_source, batch_size=config.data.batch_size,
                                                               seed=0)[0].items()}
  step = jax.jit(make_train_step(graphdef, setup.objective, tx, teachers))
  mem = step.lower(state, teacher_vars, batch).compile().memory_analysis()
  state, _ = step(state, teacher_vars, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(20):
    t0 = time.perf_counter()
    state, _ = step(state, teacher_vars, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  mib = lambda b: b / 2**20  # noqa: E731
  return {"arguments": mib(mem.argument_size_in_bytes), "temporaries": mib(mem.temp_size_in_bytes),
          "ms": 1e3 * float(np.median(times))}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teachers", type=int, default=5)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--source", default="mnist5k")
  parser.add_argument("--teacher-epochs", type=float, default=40)
  parser.add_argument("--student-epochs", type=float, default=None)
  parser.add_argument("--workdir", default="runs/ensemble")
  parser.add_argument("--out", default=str(HERE / "results.md"))
  args = parser.parse_args(argv)
  root = pathlib.Path(args.workdir) / args.source
  epochs = f",epochs={args.student_epochs}" if args.student_epochs else ""
  teachers = []
  for i in range(args.teachers):
    config = load(f"{CONFIGS / 'hinton_mnist.py'}:teacher,source={args.source},epochs={args.teacher_epochs}")
    config.seed = i
    teachers.append(run_cached(config, root / "teachers" / f"t{i}"))
  member_dirs = [root / "teachers" / f"t{i}" / "checkpoints" for i in range(args.teachers)]
  ensemble = evaluate_ensemble(member_dirs, load(f"{CONFIGS / 'hinton_mnist.py'}:student,source={args.source}"))

  results: dict[str, list[dict]] = {"student": [], "single": [], "ensemble": []}
  for seed in range(args.seeds):
    for name in results:
      if name == "student":
        config = load(f"{CONFIGS / 'hinton_mnist.py'}:student,source={args.source}{epochs}")
      else:
        config = load(f"{CONFIGS / 'ensemble_mnist.py'}:{name},teachers={args.teachers},"
                      f"teacher_dir={root / 'teachers'},source={args.source}{epochs}")
      config.seed = seed
      results[name].append(run_cached(config, root / f"{name}_seed{seed}"))

  n = teachers[0]["test_examples"]
  acc = lambda runs: mean_std([r["test_accuracy"] for r in runs], "{:.2f}", 100)  # noqa: E731
  err = lambda runs: mean_std([r["test_errors"] for r in runs])  # noqa: E731
  speed = {k: np.mean([r["steps_per_s"] for r in v]) for k, v in results.items()}
  rows = [
      f"| model | test accuracy % | test errors (of {n}) | train steps/s |", "|---|---|---|---|",
      f"| each teacher (2x1200, {args.teachers} seeds) | {acc(teachers)} | {err(teachers)} | |",
      f"| ensemble of the {args.teachers} teachers (mean of probabilities) | {100 * ensemble['test/accuracy']:.2f} "
      f"| {int(ensemble['test/errors'])} | |",
      f"| student 2x800, hard labels ({args.seeds} seeds) | {acc(results['student'])} | {err(results['student'])} "
      f"| {speed['student']:.1f} |",
      f"| student distilled from teacher t0 alone | {acc(results['single'])} | {err(results['single'])} "
      f"| {speed['single']:.1f} |",
      f"| student distilled from the {args.teachers}-teacher ensemble | {acc(results['ensemble'])} "
      f"| {err(results['ensemble'])} | {speed['ensemble']:.1f} |",
  ]
  scaling = ["| teachers in the step | step arguments (MiB) | step temporaries (MiB) | ms per step (median of 20) |",
             "|---|---|---|---|"]
  for k in range(1, args.teachers + 1):
    config = load(f"{CONFIGS / 'ensemble_mnist.py'}:ensemble,teachers={k},teacher_dir={root / 'teachers'},"
                  f"source={args.source}")
    m = step_memory(config)
    scaling.append(f"| {k} | {m['arguments']:.1f} | {m['temporaries']:.1f} | {m['ms']:.1f} |")
  mean_err = {k: np.mean([r["test_errors"] for r in v]) for k, v in results.items()}
  gap_closed = (mean_err["student"] - mean_err["ensemble"]) / max(mean_err["student"] - ensemble["test/errors"], 1e-9)
  text = "\n".join([
      f"# Ensemble distillation on `{args.source}`: paper vs kdlab", "",
      f"Produced by `python paper_repro/ensemble/run.py --teachers {args.teachers} --seeds {args.seeds}` in "
      f"{sum(r['wall_time_s'] for r in teachers + [x for v in results.values() for x in v]):.0f} s of training here "
      f"(sum over runs). Teachers: {args.teacher_epochs:g} epochs each; "
      "KD at T = 20 with weights 0.1 (labels) / 0.9 (soft targets).", "",
      *rows, "",
      f"**Paper:** {PAPER}", "",
      "Cost of the teachers, all run inside the one jitted KD step (XLA's memory analysis of the compiled "
      "step; the arguments hold every teacher's parameters):", "",
      *scaling, "",
      f"**Ours:** mean test errors: hard labels {mean_err['student']:.1f}, one teacher {mean_err['single']:.1f}, "
      f"ensemble of {args.teachers} {mean_err['ensemble']:.1f}. All teachers run inside the same jitted step, so "
      f"the step costs one teacher forward more per teacher: {speed['single']:.1f} steps/s with 1 teacher, "
      f"{speed['ensemble']:.1f} with {args.teachers}.", "",
      f"The ensemble-distilled student closes {gap_closed:.0%} of the gap between the hard-label student and the "
      f"ensemble itself ({int(ensemble['test/errors'])} errors). Where ours differs from the paper: distilling the "
      f"ensemble {'beats' if mean_err['ensemble'] < mean_err['single'] - 2 else 'does not clearly beat'} distilling "
      f"one teacher here (difference {mean_err['single'] - mean_err['ensemble']:.1f} errors, seed spread about "
      f"2); one untested guess is that with 4,000 training digits the 2x800 student, not the teacher, limits the result.", "",
  ])
  pathlib.Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
