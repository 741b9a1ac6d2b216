"""Token-level distillation of a byte-level GPT on pysrc: CE student vs kd / kd-cached / reverse_kl / jsd.

  python paper_repro/lm_token_kd/run.py --workdir runs/lm_token_kd [--seeds 3] [--vmap]

Trains the teacher of ``configs/lm_pysrc.py`` once, builds its top-k teacher cache
(``kdlab cache-teacher``), then per seed the students ``student`` (CE only), ``kd``,
``kd-cached`` (top-k KD from the cache, no teacher in the train step), ``reverse_kl`` and
``jsd``, and writes ``results.md`` beside this file: mean +/- std over seeds of the validation
loss (nats per byte), perplexity, per-token KL(teacher || student), top-1 agreement with the
teacher and token accuracy, with the wall time and machine load. Finished runs are skipped, so
an interrupted reproduction resumes (unfinished runs from their checkpoints). ``--vmap`` trains
a method's seeds in one vmapped step (``config.vmap_seeds``) instead of one after another.
``--quick`` shrinks everything (tiny models, a few steps) to smoke-test the runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np

from kdlab.config import load as load_config
from kdlab.repro import cpu_name, mean_std
from kdlab.train.loop import train

HERE = pathlib.Path(__file__).parent
CONFIG = str(HERE.parent.parent / "configs" / "lm_pysrc.py")
METHODS = ("student", "kd", "kd-cached", "reverse_kl", "jsd")
LABELS = {"teacher": "teacher (CE)", "student": "student (CE only)", "kd": "kd: KL(t || s), live teacher", "kd-cached": "kd-cached: top-k KD from the cache",
          "reverse_kl": "reverse_kl: KL(s || t)", "jsd": "jsd: generalized JSD (GKD)"}


@dataclasses.dataclass(frozen=True)
class Runs:
  """Where the runs live and the options every config of this invocation gets."""
  root: pathlib.Path
  quick: bool
  ce: float | None  # --ce: the CE weight of the distilled students (None: the config's default)
  beta: float | None  # --beta: the jsd student's JSD beta (None: the config's default)

  def config(self, variant: str, steps: int | None = None) -> Any:
    arg = f"{variant},teacher={self.root / 'teacher' / 'checkpoints'},cache={self.root / 'teacher_cache'}"
    arg += (",quick" if self.quick else "") + (f",steps={steps}" if steps else "") + (
        f",ce={self.ce}" if self.ce is not None else "") + (f",beta={self.beta}" if self.beta is not None else "")
    return load_config(f"{CONFIG}:{arg}")


def _train(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` unless it finished there; returns its summary."""
  if (workdir / "summary.json").exists():
    return json.loads((workdir / "summary.json").read_text())
  t0 = time.time()
  summary = train(config, workdir, use_wandb=False, progress=False)
  print(f"  {workdir}: val loss {summary['val_loss']:.4f}, KL(teacher || student) "
        f"{summary.get('kl_teacher') or float('nan'):.4f} ({time.time() - t0:.0f} s)", flush=True)
  return summary


def _seed_summaries(method: str, runs: Runs, seeds: list[int], vmap: bool, steps: int | None
                    ) -> list[dict[str, Any]]:
  config, root = runs.config(method, steps), runs.root
  if vmap:
    config.seed, config.vmap_seeds = seeds[0], len(seeds)
    return _train(config, root / method)["runs"]
  out = []
  for seed in seeds:
    config.seed = seed
    out.append(_train(config, root / method / f"seed{seed}"))
  return out


def _cache(runs: Runs) -> tuple[float, int]:
  """Builds the teacher cache (skipped when finished); its build time and size on disk."""
  from kdlab.offline.cache_teacher import cache_teacher
  out = runs.root / "teacher_cache"
  t0 = time.time()
  meta, built = cache_teacher(runs.config("kd-cached"), out)
  seconds = time.time() - t0 if built else float(meta["created"]["seconds"])
  size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  return seconds, size


def _row(label: str, runs: list[dict[str, Any]]) -> str:
  def col(key, fmt="{:.4f}", scale=1.0):
    values = [r.get(key) for r in runs]
    if any(v is None for v in values):
      return "-"
    return fmt.format(scale * values[0]) if len(values) == 1 else mean_std(values, fmt, scale)
  return (f"| {label} | {len(runs)} | {col('val_loss')} | {col('val_ppl', '{:.3f}')} | {col('kl_teacher')} | "
          f"{col('agreement_top1', '{:.2f}', 100)} | {col('val_accuracy', '{:.2f}', 100)} | "
          f"{col('wall_time_s', '{:.0f}')} |")


def _objective(config: Any) -> str:
  """``"0.5 ce + 0.5 kd (T=1)"`` from ``config.objective``."""
  parts = []
  for term in config.objective:
    term = dict(term)
    extra = ", ".join(f"{'T' if k == 'temperature' else k}={v}" for k, v in term.items()
                      if k in ("temperature", "beta"))
    weight = term["weight"]
    if isinstance(weight, dict):  # lm_pysrc's warm-up: 0, then a linear rise to the term's weight
      begin, steps = weight["transition_begin"], weight["transition_steps"]
      weight = f"{weight['end_value']:.4g} (0 until step {begin}, reached at step {begin + steps})"
    else:
      weight = f"{weight:.4g}"
    parts.append(f"{weight} {term['loss']}" + (f" ({extra})" if extra else ""))
  return " + ".join(parts)


def _load() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/lm_token_kd")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--vmap", action="store_true", help="train each method's seeds in one vmapped step")
  parser.add_argument("--teacher-steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--student-steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument("--ce", type=float, default=None,
                      help="CE weight alpha of the distilled students (alpha CE + (1 - alpha) divergence); "
                           "default: the config's")
  parser.add_argument("--beta", type=float, default=None, help="JSD beta of the jsd student; default: the config's")
  parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (smoke test)")
  parser.add_argument("--out", default=str(HERE / "results.md"), help="where to write the results table")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or "student" not in methods:
    parser.error(f"--methods: unknown {unknown}" if unknown else "--methods must include student (the baseline)")
  root = pathlib.Path(args.workdir)
  runs = Runs(root, args.quick, args.ce, args.beta)
  seeds = list(range(args.seeds))
  import jax
  # The seeds of a method compile the same steps: keep the executables on disk between runs.
  jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  start, load_start = time.time(), _load()
  print(f"lm_token_kd: {', '.join(methods)} over seeds {seeds}, runs in {root} (load {load_start})", flush=True)

  t0 = time.time()
  teacher = _train(runs.config("teacher", args.teacher_steps), root / "teacher")
  teacher_time = time.time() - t0
  cache_line, seconds = "", 0.0
  if "kd-cached" in methods:
    seconds, size = _cache(runs)
    cache_line = (f"The teacher cache (top-{runs.config('kd-cached').teacher_cache_k} "
                  f"log-probabilities per byte of the train split) took {seconds:.0f} s to build and holds "
                  f"{size / 2**20:.0f} MiB.")
  results = {m: _seed_summaries(m, runs, seeds, args.vmap, args.student_steps) for m in methods}
  total = time.time() - start
  load_end = _load()
  # What a fresh invocation costs at the load these runs saw, cached runs included.
  fresh = teacher["wall_time_s"] + seconds + sum(r["wall_time_s"] for m in methods for r in results[m])

  base = np.mean([r["kl_teacher"] for r in results["student"]])
  checks = []
  for m in (m for m in methods if m != "student"):
    kl = [r["kl_teacher"] for r in results[m]]
    per_seed = all(a < b["kl_teacher"] for a, b in zip(kl, results["student"]))
    checks.append(f"- {m}: mean KL {np.mean(kl):.4f} vs {base:.4f} for the CE student: "
                  f"{'lower' if np.mean(kl) < base else 'NOT lower'}"
                  f"{' (lower for every seed)' if per_seed else ' (not lower for every seed)'}")
  config = runs.config("student", args.student_steps)
  t_config = runs.config("teacher", args.teacher_steps)
  command = "python paper_repro/lm_token_kd/run.py" + "".join(
      f" {flag}" for flag, on in (("--quick", args.quick), ("--vmap", args.vmap)) if on) + (
      f" --seeds {args.seeds}" if args.seeds != 3 else "") + (
      f" --teacher-steps {args.teacher_steps}" if args.teacher_steps else "") + (
      f" --student-steps {args.student_steps}" if args.student_steps else "") + (
      f" --ce {args.ce:g}" if args.ce is not None else "") + (
      f" --beta {args.beta:g}" if args.beta is not None else "") + (
      f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
  header = ("| model | runs | val loss (nats/byte) | val ppl | KL(teacher \\|\\| student) | top-1 agreement (%) "
            "| token accuracy (%) | wall time per run (s) |")
  text = "\n".join([
      "# Token-level distillation of a byte-level GPT on pysrc",
      "",
      f"Produced by `{command}` (workdir `{root}`).",
      "",
      f"Data: `pysrc` (this interpreter's standard library .py files, Python {platform.python_version()}), "
      f"byte tokens, {config.data.seq_len}-byte packed sequences; train on the first "
      f"{config.data.max_bytes / 2**20:g} MiB of the train split, evaluate on the first "
      f"{config.data.eval_max_bytes / 2**10:g} KiB of the validation split ({teacher['val_tokens']:,} target "
      f"bytes). Teacher: gpt d_model {t_config.model.d_model}, {t_config.model.num_layers} layers, "
      f"{t_config.train.num_steps} steps. Students: gpt d_model {config.model.d_model}, "
      f"{config.model.num_layers} layers, {config.train.num_steps} steps of {config.data.batch_size} sequences, "
      f"AdamW {config.optimizer.learning_rate:g} with cosine decay, identical for every method; "
      f"divergences at T = 1. Metrics per validation byte (token-weighted); KL and agreement against the "
      f"teacher; mean +/- sample std over seeds {seeds}.",
      "",
      "Objectives: " + "; ".join(f"{m}: {_objective(runs.config(m, args.student_steps))}"
                                 for m in methods) + ".",
      "",
      header,
      "|---|---|---|---|---|---|---|---|",
      _row(LABELS["teacher"], [teacher]),
      *(_row(LABELS[m], results[m]) for m in methods),
      "",
      "Does every distilled student have a lower validation KL to the teacher than the CE-only student?",
      "",
      *checks,
      "",
      *([cache_line, ""] if cache_line else []),
      f"Wall time: {fresh / 60:.1f} min summed over every run (teacher {teacher['wall_time_s'] / 60:.1f} min, "
      f"teacher cache {seconds / 60:.1f} min, {sum(len(results[m]) for m in methods)} students), i.e. a fresh "
      f"invocation at that load; this invocation took {total / 60:.1f} min (teacher {teacher_time / 60:.1f} min; "
      f"runs finished earlier in the workdir are reused). Machine: {os.cpu_count()} CPU cores ({cpu_name()}), "
      f"shared with other jobs; load average (1 / 5 / 15 min) {load_start} at the start and {load_end} at "
      f"the end (2.0 = both cores busy).",
      *([] if "kd-cached" in methods else ["", "kd-cached was left out of this invocation (--methods)."]),
      "",
  ])
  pathlib.Path(args.out).write_text(text)
  print()
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
