"""GKD (Agarwal et al. 2024) on pysrc: CE, supervised KD, seq-KD, on-policy KL / reverse KL, GKD at lambda 0.5 and 1.

  python paper_repro/gkd2024/run.py [--workdir runs/gkd2024] [--seeds 3] [--init ce|scratch]
      [--preset small|lm_pysrc] [--prompts 256] [--methods student,gkd,...] [--quick] [--out FILE]

Trains a byte-level GPT teacher on pysrc (``configs/lm_pysrc.py:teacher``; with ``--preset
lm_pysrc`` the config's own sizes and ``runs/lm_pysrc/teacher`` when it exists), builds the
teacher's continuations of the training prompts for sequence-level KD (``kdlab generate-data``),
then trains the students of ``configs/lm_gkd.py`` (3 seeds in one vmapped step per method) and
writes ``results.md`` beside this file: mean +/- std over seeds of the validation per-token
KL(teacher || student), the validation perplexity, and the teacher's per-token NLL of the
student's own samples (continuations of held-out prompts: :func:`kdlab.offline.sample.evaluate_samples`),
with the paper's qualitative findings beside ours. ``--init ce`` (the default) distils into a
CE-trained student, as the papers do: every method resumes the CE student's half-way checkpoint
and trains the second half with its own objective; ``--init scratch`` trains every student from
random initialization. Finished runs are reused, so an interrupted reproduction resumes. ``--preset small`` (the default) shrinks models and sequences so the whole
reproduction fits in an hour on 2 CPU cores; ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from kdlab.config import load as load_config
from kdlab.repro import StageTimes, cpu_name, mean_std
from kdlab.train.loop import train

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
LM, GKD = str(ROOT / "configs" / "lm_pysrc.py"), str(ROOT / "configs" / "lm_gkd.py")
METHODS = ("student", "supervised_kd", "seqkd", "onpolicy_kd", "onpolicy_rkl", "gkd", "gkd_full")
LABELS = {
    "teacher": "teacher (CE)",
    "student": "student, CE only",
    "supervised_kd": "supervised KD: KL(t \\|\\| s) on data",
    "seqkd": "sequence-level KD: CE on teacher samples",
    "onpolicy_kd": "on-policy KL(t \\|\\| s), lambda 1",
    "onpolicy_rkl": "on-policy reverse KL(s \\|\\| t), lambda 1",
    "gkd": "GKD: JSD(0.5), lambda 0.5",
    "gkd_full": "GKD: JSD(0.5), lambda 1",
}
# The "small" preset: what fits in an hour on 2 CPU cores (see results.md for the measured time).
SMALL = dict(seq_len=64, new_tokens=32, max_bytes=1 << 20, eval_max_bytes=64 << 10,
             teacher=dict(d_model=128, num_layers=4, num_heads=4), student=dict(d_model=64, num_layers=2, num_heads=2),
             teacher_steps=1000, student_steps=400, warm_steps=300)
# --init ce: every student first trains warm_steps steps with CE (the "student" run), then each method
# trains warm_steps more steps with its own objective from that checkpoint (the GKD and MiniLLM papers
# distil into a supervised fine-tuned student). --init scratch: student_steps steps from random init.

# Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
# Mistakes" (ICLR 2024): T5 students distilled from T5-XL teachers on summarization (XSum),
# translation (WMT en-de) and arithmetic reasoning (GSM8K), scored by ROUGE / BLEU / accuracy.
PAPER = [
    "Training on the student's own samples helps most: on-policy GKD (lambda = 1) outperforms supervised KD and "
    "sequence-level KD (and mixed-data variants such as ImitKD) on summarization, translation and arithmetic "
    "reasoning, across student sizes; the data source matters more than the choice of divergence.",
    "The best divergence is task dependent: mode-seeking ones (reverse KL, JSD with a large beta) do well where "
    "quality of greedy / low-temperature samples matters, forward KL where diversity at higher temperature does.",
]


def _set(node: Any, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def _config(variant: str, args: argparse.Namespace, root: pathlib.Path) -> Any:
  quick = ",quick" if args.quick else ""
  if variant == "teacher":
    config = load_config(f"{LM}:teacher{quick}")
  else:
    config = load_config(f"{GKD}:{variant},teacher={_teacher_dir(args, root)},gen={root / 'teacher_data'}{quick}")
  if args.preset == "small" and not args.quick:
    s = SMALL
    if variant == "teacher":
      steps, every = s["teacher_steps"], s["teacher_steps"] // 2
    elif args.init == "ce":
      steps, every = 2 * s["warm_steps"], s["warm_steps"]  # checkpoints at warm_steps (the warm start) and the end
    else:
      steps, every = s["student_steps"], s["student_steps"] // 2
    size = s["teacher" if variant == "teacher" else "student"]
    # Every field the results depend on is pinned here (not inherited from lm_pysrc, which may change).
    config.model = ml_collections.ConfigDict(dict(
        name="gpt", vocab_size=256, max_len=s["seq_len"], mlp_ratio=4, tie_embeddings=True, dropout=0.0, norm="rms",
        **size))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=2e-3, weight_decay=0.01, schedule="cosine", warmup_epochs=0.1,
        boundaries_epochs=[], decay=0.1))
    fields = {"data.seq_len": s["seq_len"], "data.max_bytes": s["max_bytes"],
              "data.eval_max_bytes": s["eval_max_bytes"], "data.batch_size": 32, "data.eval_batch_size": 128,
              "train.num_steps": steps, "train.num_epochs": 1.0, "train.log_every_steps": 50,
              # 1 MiB of 64-byte sequences in batches of 32 is 512 steps per epoch: evaluate at the end.
              "train.eval_every_epochs": steps / 512, "train.checkpoint_every_epochs": every / 512}
    if config.get("on_policy"):
      fields["on_policy.max_new_tokens"] = s["new_tokens"]
    if config.get("generate_data"):
      fields["generate_data.max_new_tokens"] = s["new_tokens"]
    for path, value in fields.items():
      _set(config, path, value)
  if variant != "teacher" and args.init == "ce":  # a checkpoint at the warm start (half-way) and at the end
    config.train.checkpoint_every_epochs = config.train.num_steps / 2 / (64 if args.quick else 512)
  return config


def _run_dir(root: pathlib.Path, method: str, args: argparse.Namespace) -> pathlib.Path:
  """Where a method's runs live: ``WORKDIR/METHOD`` (``--init ce``) or ``WORKDIR/scratch/METHOD``."""
  return root / method if args.init == "ce" else root / "scratch" / method


def _stage(method: str, args: argparse.Namespace) -> str:
  return method if args.init == "ce" else f"scratch/{method}"


def _warm_start(config: Any, root: pathlib.Path, method: str, seeds: list[int]) -> None:
  """Puts the CE student's checkpoint at half-way into ``method``'s run folders, so that its run
  resumes from there with its own objective (same optimizer state, schedule and data order)."""
  import shutil
  step = str(config.train.num_steps // 2)
  for seed in seeds:
    sub = f"seed{seed}" if len(seeds) > 1 else ""
    if (root / method / sub / "checkpoints").exists():
      continue  # set up before (a resumed reproduction)
    src = root / "student" / sub / "checkpoints" / step
    if not src.is_dir():
      raise SystemExit(f"gkd2024: no CE checkpoint at {src} to warm-start {method} from; delete "
                       f"{root / 'student'} and rerun")
    shutil.copytree(src, root / method / sub / "checkpoints" / step)


def _teacher_dir(args: argparse.Namespace, root: pathlib.Path) -> pathlib.Path:
  if args.preset == "lm_pysrc" and not args.quick and (ROOT / "runs/lm_pysrc/teacher/summary.json").exists():
    return ROOT / "runs/lm_pysrc/teacher/checkpoints"
  return root / "teacher" / "checkpoints"


def _train(config: Any, workdir: pathlib.Path, times: StageTimes, stage: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` unless it finished there; returns its summary."""
  if (workdir / "summary.json").exists():
    return json.loads((workdir / "summary.json").read_text())
  t0 = time.time()
  summary = train(config, workdir, use_wandb=False, progress=False)
  times.add(stage, time.time() - t0)
  print(f"  {workdir}: {time.time() - t0:.0f} s", flush=True)
  return summary


def _samples(workdir: pathlib.Path, args: argparse.Namespace, times: StageTimes, stage: str) -> dict[str, float]:
  """The teacher's NLL of the run's own samples (cached in ``samples.json``)."""
  from kdlab.offline.sample import evaluate_samples
  path = workdir / "samples.json"
  if path.exists():
    return json.loads(path.read_text())
  t0 = time.time()
  result = evaluate_samples(workdir, max_new_tokens=_new_tokens(args), num_prompts=args.prompts, temperature=1.0,
                            seed=0)
  path.write_text(json.dumps(result, indent=2))
  times.add(stage, time.time() - t0)
  return result


def _load() -> str:
  return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/gkd2024")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--preset", choices=("small", "lm_pysrc"), default="small")
  parser.add_argument("--init", choices=("ce", "scratch"), default="ce",
                      help="ce: distil into the CE student's half-way checkpoint (default); scratch: from random init")
  parser.add_argument("--prompts", type=int, default=256, help="validation prompts the students continue")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (smoke test)")
  parser.add_argument("--out", default=None, help="default: results.md (--init ce) or results_scratch.md beside "
                                                  "this file")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  methods = ["student", *[m for m in methods if m != "student"]]  # the CE run first: the others may start from it
  if sorted(set(methods) - set(METHODS)):
    parser.error(f"--methods: a subset of {','.join(METHODS)} (student, the CE baseline, is always run)")
  root = pathlib.Path(args.workdir)
  seeds = list(range(args.seeds))
  start, load_start = time.time(), _load()
  print(f"gkd2024: {', '.join(methods)}, seeds {seeds}, preset {args.preset}, runs in {root} (load {load_start})",
        flush=True)
  times = StageTimes(root)

  teacher_dir = _teacher_dir(args, root)
  teacher = _train(_config("teacher", args, root), teacher_dir.parent, times, "teacher")
  gen_meta = None
  if "seqkd" in methods:
    from kdlab.offline.generate_data import generate_data
    t0 = time.time()
    gen_meta, built = generate_data(_config("seqkd", args, root), root / "teacher_data")
    if built:
      times.add("generate-data", time.time() - t0)
  results: dict[str, list[dict[str, Any]]] = {}
  generate_share: dict[str, float] = {}
  for method in methods:
    config = _config(method, args, root)
    config.seed, config.vmap_seeds = seeds[0], len(seeds)
    run_dir, stage = _run_dir(root, method, args), _stage(method, args)
    if args.init == "ce" and method != "student" and not (run_dir / "summary.json").exists():
      _warm_start(config, root, method, seeds)
    summary = _train(config, run_dir, times, stage)
    runs = summary["runs"] if len(seeds) > 1 else [summary]
    for seed, run in zip(seeds, runs):
      workdir = run_dir / f"seed{seed}" if len(seeds) > 1 else run_dir
      run.update({f"samples_{k}": v for k, v in _samples(workdir, args, times, f"{stage}/samples").items()})
    results[method] = runs
    if config.get("on_policy"):
      log = run_dir / (f"seed{seeds[0]}" if len(seeds) > 1 else "") / "metrics.jsonl"
      lines = [json.loads(l) for l in log.read_text().splitlines()]
      shares = [l["time/generate_fraction"] for l in lines if "time/generate_fraction" in l]
      generate_share[method] = float(np.mean(shares)) if shares else float("nan")
  reference = _teacher_reference(root, args, times)  # the teacher's own samples, scored by itself
  text = _report(args, root, methods, results, teacher, reference, times, time.time() - start, load_start,
                 generate_share, gen_meta)
  out = args.out or HERE / ("results.md" if args.init == "ce" else "results_scratch.md")
  pathlib.Path(out).write_text(text)
  print()
  print(text)
  return 0


def _new_tokens(args: argparse.Namespace) -> int:
  return 16 if args.quick else (SMALL["new_tokens"] if args.preset == "small" else 64)


def _teacher_reference(root: pathlib.Path, args: argparse.Namespace, times: StageTimes) -> dict[str, float]:
  path = root / "teacher_samples.json"
  if path.exists():
    return json.loads(path.read_text())
  t0 = time.time()
  import jax

  from kdlab.offline.sample import load_lm
  from kdlab.train import tasks
  from kdlab.train.on_policy import teacher_nll_of_samples
  config = _config("student", args, root)
  n = _new_tokens(args)
  p = config.data.seq_len - n
  val = tasks.for_source(config.data.source).load(config.data)[1].records
  rows = np.flatnonzero(val.mask[:, :p + n].min(axis=1) > 0)[:args.prompts]
  teacher = load_lm(_teacher_dir(args, root).parent)
  result = teacher_nll_of_samples(teacher, teacher, val.tokens[rows, :p], max_new_tokens=n, temperature=1.0,
                                  key=jax.random.key(0))
  path.write_text(json.dumps(result, indent=2))
  times.add("teacher/samples", time.time() - t0)
  return result


def _report(args: argparse.Namespace, root: pathlib.Path, methods: list[str], results: dict[str, list[dict]],
            teacher: dict[str, Any], reference: dict[str, float], times: StageTimes, total: float, load_start: str,
            generate_share: dict[str, float], gen_meta: dict[str, Any] | None) -> str:
  def col(runs, key, fmt="{:.4f}"):
    values = [r.get(key) for r in runs]
    return "-" if any(v is None for v in values) else mean_std(values, fmt)

  def minutes(*stages):
    return f"{times.get(*stages) / 60:.1f}"

  rows = [f"| {LABELS['teacher']} | 1 | - | {teacher['val_ppl']:.3f} | {reference['teacher_nll']:.4f} | "
          f"{reference['teacher_nll']:.4f} | {minutes('teacher', 'teacher/samples')} |"]
  for m in methods:
    r = results[m]
    stages = (_stage(m, args), f"{_stage(m, args)}/samples") + (("generate-data",) if m == "seqkd" else ())
    rows.append(f"| {LABELS[m]} | {len(r)} | {col(r, 'kl_teacher')} | {col(r, 'val_ppl', '{:.3f}')} | "
                f"{col(r, 'samples_teacher_nll')} | {col(r, 'samples_student_nll')} | {minutes(*stages)} |")
  used = ["teacher", "teacher/samples", *(["generate-data"] if "seqkd" in methods else []),
          *[x for m in methods for x in (_stage(m, args), f"{_stage(m, args)}/samples")]]
  nll = {m: float(np.mean([r["samples_teacher_nll"] for r in results[m]])) for m in methods}
  nll_std = {m: float(np.std([r["samples_teacher_nll"] for r in results[m]], ddof=1)) if len(results[m]) > 1
             else 0.0 for m in methods}
  kl = {m: float(np.mean([r["kl_teacher"] for r in results[m]])) for m in methods}
  on = [m for m in ("onpolicy_kd", "onpolicy_rkl", "gkd", "gkd_full") if m in methods]
  off = [m for m in ("supervised_kd", "seqkd") if m in methods]
  findings, differs = [], []
  findings.append("- Ranking by sample quality (teacher NLL of the student's samples, lower is better): "
                  + " < ".join(f"{m} ({nll[m]:.4f})" for m in sorted(methods, key=nll.get)) + ".")
  findings.append("- Ranking by validation KL(teacher || student) on the data: "
                  + " < ".join(f"{m} ({kl[m]:.4f})" for m in sorted(methods, key=kl.get)) + ".")
  if on and off:
    best_off = min(off, key=nll.get)
    beat = [m for m in on if nll[m] < nll[best_off]]
    # "Clearly": the gap exceeds the larger of the two seed standard deviations.
    clear = [m for m in beat if nll[best_off] - nll[m] > max(nll_std[m], nll_std[best_off])]
    findings.append(f"- On-policy vs off-policy: {len(beat)} of {len(on)} on-policy methods have a lower teacher NLL "
                    f"of their samples than the best off-policy method ({best_off}, {nll[best_off]:.4f})"
                    + (f" ({len(clear)} by more than one seed std)" if beat else "") + ".")
    if len(beat) == len(on):
      differs.append("- Agrees with the paper: every on-policy variant writes samples the teacher scores as more "
                     "likely than those of supervised KD and sequence-level KD.")
    else:
      missing = [m for m in on if m not in beat]
      differs.append(f"- Differs from the paper: {', '.join(missing)} did not beat {best_off} on sample quality "
                     f"here.")
  if on:
    best = min(on, key=nll.get)
    differs.append(f"- The best on-policy divergence here is {best} ({LABELS[best]}); the paper finds the best "
                   f"divergence task dependent, so one small byte-level task says little about which is best in "
                   f"general.")
  if "seqkd" in methods and "student" in methods:
    verdict = "better" if nll["seqkd"] < nll["student"] else "worse"
    differs.append(f"- Sequence-level KD is {verdict} than the CE-only student on sample quality ({nll['seqkd']:.4f} "
                   f"vs {nll['student']:.4f}) and its validation KL on the data is {kl['seqkd']:.4f} vs "
                   f"{kl['student']:.4f}: it trains only on the teacher's continuations of the prompts, never on "
                   f"the data's own bytes, so the data metrics measure a shift of distribution for it.")
  if generate_share:
    findings.append("- Share of the on-policy step time spent generating (seed 0's log, compile excluded): "
                    + ", ".join(f"{m} {100 * v:.0f}%" for m, v in generate_share.items()) + ".")
  if on:
    differs.append("- On-policy batches put the loss on the generated positions only (after a prompt of half the "
                   "sequence), while the data metrics (validation KL and perplexity) average over every position, "
                   "including the short contexts at the start of each sequence that only the off-policy batches "
                   "train; the sample-quality measure uses the same prompt length as training.")
  if args.init == "scratch":
    differs.append("- Every student here starts from random initialization, unlike the papers, which distil into a "
                   "supervised fine-tuned student: early on the student's samples are noise, and the teacher's "
                   "feedback on them says little about the data. results.md (`--init ce`) is the comparison "
                   "with a CE-trained student.")
  differs += [
      "- Scale and task: the paper distils T5 models (up to 3B) on summarization, translation and GSM8K with "
      "task metrics (ROUGE, BLEU, accuracy); here tiny byte-level GPTs continue Python source, and the quality "
      "measure is the teacher's NLL of the student's samples (the teacher as the judge), which rewards "
      "mode-seeking students; read it with the student's own NLL (its entropy) beside it.",
      "- Generation: fixed-length continuations (no end-of-sequence stop), temperature 1 in training and "
      "evaluation, no top-k/top-p. The paper also reports temperature sweeps, which we did not run.",
      "- MiniLLM's reverse KL is the single-step (token-level, exact over the vocabulary) term on the student's "
      "samples, without the policy-gradient term over long-term rewards.",
  ]
  # What the runs were trained with (their config.json), not what the config files say now.
  saved = lambda path: ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))  # noqa: E731
  student = saved(_run_dir(root, "student", args))
  t_config = saved(_teacher_dir(args, root).parent)
  op_method = next((m for m in ("gkd", "gkd_full", "onpolicy_kd", "onpolicy_rkl") if m in methods), None)
  op = saved(_run_dir(root, op_method, args)).on_policy if op_method else _config("gkd", args, root).on_policy
  prompt = student.data.seq_len - op.max_new_tokens
  command = "python paper_repro/gkd2024/run.py" + (" --quick" if args.quick else "") + (
      " --init scratch" if args.init == "scratch" else "") + (
      f" --preset {args.preset}" if args.preset != "small" else "") + (
      f" --seeds {args.seeds}" if args.seeds != 3 else "") + (
      f" --prompts {args.prompts}" if args.prompts != 256 else "") + (
      f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
  gen_line = ""
  if gen_meta is not None:
    gen_line = (f" Sequence-level KD: CE on the teacher's {gen_meta['max_new_tokens']}-byte continuations "
                f"(temperature {gen_meta['temperature']:g}) of all {gen_meta['num_sequences']:,} training prompts, "
                f"built by `kdlab generate-data` in {gen_meta['created']['seconds']:.0f} s.")
  lines = [
      "# On-policy distillation (GKD) of a byte-level GPT on pysrc",
      "",
      f"Produced by `{command}` (workdir `{root}`); every number below was measured by it.",
      "",
      f"Setting (preset `{args.preset}`{', quick' if args.quick else ''}): `pysrc` (this interpreter's standard "
      f"library .py files, Python {platform.python_version()}), byte tokens, {student.data.seq_len}-byte "
      f"sequences from the first {student.data.max_bytes / 2**10:g} KiB of the train split; validation on the first "
      f"{student.data.eval_max_bytes / 2**10:g} KiB of the validation split ({teacher['val_tokens']:,} target bytes). "
      f"Teacher: gpt d_model {t_config.model.d_model}, {t_config.model.num_layers} layers, "
      f"{t_config.train.num_steps} steps of {t_config.data.batch_size} sequences. Students: gpt d_model "
      f"{student.model.d_model}, {student.model.num_layers} layers, {student.train.num_steps} steps of "
      f"{student.data.batch_size} sequences (AdamW {student.optimizer.learning_rate:g}, cosine), the same for every "
      f"method; {args.seeds} seeds trained in one vmapped step per method. "
      + (f"Warm start (`--init ce`, as the GKD and MiniLLM papers distil into a supervised fine-tuned student): "
         f"the first {student.train.num_steps // 2} steps are CE on the data for every method (the CE-only "
         f"student's run); each other method resumes that run's step-{student.train.num_steps // 2} checkpoint "
         f"(optimizer state, schedule and data order included) and trains the last "
         f"{student.train.num_steps - student.train.num_steps // 2} steps with its own objective. "
         if args.init == "ce" else "Every student starts from random initialization (`--init scratch`). ")
      + f"On-policy batches: the student samples "
      f"{op.max_new_tokens} bytes (temperature {op.temperature:g}) after the first {prompt} bytes of each training "
      f"sequence, the teacher scores them in the train step, and the divergence is averaged over those "
      f"{op.max_new_tokens} bytes only. Off-policy batches (supervised KD, the other half of GKD at lambda 0.5) "
      f"are data, with the divergence on every byte.{gen_line} Divergences at T = 1; JSD with beta = 0.5.",
      "",
      f"Sample quality: each student continues the first {prompt} bytes of {results['student'][0]['samples_prompts']} "
      f"validation sequences with {op.max_new_tokens} bytes (temperature 1, the same keys for every model) and the "
      f"teacher scores them: its NLL per generated byte (lower: the student writes what the teacher finds "
      f"likely). The student's own NLL of its samples estimates its per-byte entropy (a low teacher NLL with a low "
      f"entropy can also mean a less diverse student). The teacher row scores the teacher's own samples. "
      f"Mean +/- sample std over seeds {list(range(args.seeds))}.",
      "",
      "| model | seeds | val KL(teacher \\|\\| student) per byte | val ppl | teacher NLL of own samples | "
      "student NLL of own samples | compute time (min, all seeds" + (
          "; the CE run includes the shared warm-up" if args.init == "ce" else "") + ") |",
      "|---|---|---|---|---|---|---|",
      *rows,
      "",
      "## Ours",
      "",
      *findings,
      "",
      "## The paper's qualitative findings (Agarwal et al. 2024)",
      "",
      *[f"- {p}" for p in PAPER],
      "",
      "## Where ours agrees and differs",
      "",
      *differs,
      "",
      f"Compute time of all stages: {minutes(*used)} min (summed over the invocations that ran "
      f"them; this invocation: {total / 60:.1f} min). Machine: {os.cpu_count()} CPU cores ({cpu_name()}), shared with "
      f"other work; load average (1 / 5 / 15 min) {load_start} at the start of this invocation and {_load()} at "
      f"its end.",
      "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
