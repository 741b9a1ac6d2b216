"""Trains any cell of the CRD / DKD CIFAR-100 table and writes results.md (paper vs kdlab, every cell).

  python paper_repro/crd2019/run.py --pair resnet32x4-resnet8x4 --method crd --seeds 3
  python paper_repro/crd2019/run.py --report-only        # rewrite results.md from the finished runs

The teacher (``configs/cifar100_crd.py:teacher-TEACHER``, seed 0) is trained first when
``RUNS/teacher-TEACHER`` holds no finished run; then the student for seeds 0..N-1 in
``RUNS/TEACHER-STUDENT-METHOD/seed{k}`` (``ce``, the student from scratch, in
``RUNS/scratch-STUDENT/seed{k}``, shared by the pairs with that student). Finished runs are reused
and interrupted ones resume. results.md lists, per pair and method, the published top-1 and ours
(last epoch, as the papers report, and best epoch; mean +/- std over seeds), or the command for a
cell not run yet. CIFAR-100 must be prepared for TFDS (``--data_dir``); nothing is downloaded.
``--mock`` runs the whole procedure in 2 steps on ``tfds.testing.mock_data`` (a check of this
script; its numbers mean nothing and go to RUNS/results.md, never to this folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import table  # noqa: E402  (this folder's published numbers)

from kdlab.config import load, load_python_file  # noqa: E402
from kdlab.repro import mean_std, run_cached  # noqa: E402

CONFIG = HERE.parent.parent / "configs" / "cifar100_crd.py"
crd = load_python_file(CONFIG, "crd2019_run")


def teacher_dir(runs: pathlib.Path, teacher: str) -> pathlib.Path:
  return runs / f"teacher-{teacher}"


def student_dir(runs: pathlib.Path, teacher: str, student: str, method: str) -> pathlib.Path:
  return runs / (f"scratch-{student}" if method == "ce" else f"{teacher}-{student}-{method}")


def _options(args: argparse.Namespace, seed: int) -> str:
  opts = [f"seed={seed}"]
  if args.data_dir:
    opts.append(f"data_dir={args.data_dir}")
  if args.mock:
    opts.append("mock")
  return "," + ",".join(opts)


def run_cell(args: argparse.Namespace, teacher: str, student: str, method: str) -> None:
  runs = pathlib.Path(args.runs).absolute()
  if method != "ce":
    t_dir = teacher_dir(runs, teacher)
    if not (t_dir / "summary.json").exists():
      print(f"teacher {teacher}: training it first in {t_dir}", flush=True)
    run_cached(load(f"{CONFIG}:teacher-{teacher}{_options(args, 0)}"), t_dir)
  for seed in range(args.seeds):
    arg = f"{teacher}-{student}-{method}{_options(args, seed)}"
    if method != "ce":
      arg += f",teacher={teacher_dir(runs, teacher) / 'checkpoints'}"
    run_cached(load(f"{CONFIG}:{arg}"), student_dir(runs, teacher, student, method) / f"seed{seed}")


def _summaries(directory: pathlib.Path) -> list[dict[str, Any]]:
  """Finished seeds of one cell (``seed{k}/summary.json``), or the teacher's own summary."""
  if (directory / "summary.json").exists():
    return [json.loads((directory / "summary.json").read_text())]
  return [json.loads(p.read_text()) for p in sorted(directory.glob("seed*/summary.json"))]


def _ours(found: list[dict[str, Any]]) -> tuple[str, str, str]:
  if not found:
    return "", "", ""
  last = mean_std([s["test_accuracy"] for s in found], "{:.2f}", 100)
  best = mean_std([s["best_test_accuracy"] for s in found], "{:.2f}", 100)
  return last, best, str(len(found))


def write_results(runs: pathlib.Path, out: pathlib.Path, mock: bool, shown: str) -> int:
  """Writes the paper-vs-ours tables (``shown``: how to name ``runs`` there); returns the number of
  cells with at least one finished run."""
  done, body = 0, []
  for pair in table.PAIRS:
    teacher, student = pair.split("-")
    body += [f"## {teacher} -> {student}", "",
             "| | paper | ours, last epoch | ours, best epoch | seeds | status |", "|---|---|---|---|---|---|"]
    for row in table.ROWS:
      published = table.paper(pair, row)
      paper = "-" if published is None else f"{published:.2f}"
      if row == "fsp" and not crd.applicable(teacher, student, row):
        body.append(f"| {table.LABELS[row]} | {paper} | | | | n/a: FSP needs equal tap widths (no such cell) |")
        continue
      if row == "teacher":  # Trained (seed 0) by the first cell run with this teacher.
        found, cmd = _summaries(teacher_dir(runs, teacher)), f"--pair {pair} --method kd"
      else:
        found = _summaries(student_dir(runs, teacher, student, row))
        cmd = f"--pair {pair} --method {row} --seeds 3"
      last, best, seeds = _ours(found)
      done += bool(found)
      status = "run here" if found else f"not run: `python paper_repro/crd2019/run.py {cmd}`"
      body.append(f"| {table.LABELS[row]} | {paper} | {last} | {best} | {seeds} | {status} |")
    body.append("")
  head = [
      "# CRD (Tian et al. 2020) and DKD (Zhao et al. 2022) on CIFAR-100: paper vs kdlab", "",
      "Top-1 test accuracy (%) on the 10,000 CIFAR-100 test images. Paper: the CRD paper's Tables 1-2",
      "(RepDistiller's README; mean of 5 runs for the same-architecture pairs, 3 for the others) and",
      "DKD's (mdistiller's README); `-` where the paper has no number. Ours: mean +/- std over seeds of",
      "the last epoch (what both papers report) and of the best epoch, from the runs under",
      f"`{shown}`. Written by `python paper_repro/crd2019/run.py` (`--report-only` rewrites it).", ""]
  if mock:
    head += ["**MOCK RUN: 2 training steps on random images; these numbers measure nothing.**", ""]
  elif not done:
    head += ["**No cell has been run.** CIFAR-100 is not on the machine where this benchmark was built and",
             "that machine has no network, so every cell below says *not run* and gives the command that",
             "runs it (on a machine with CIFAR-100 prepared for TFDS; a GPU makes 240 epochs practical).",
             "What was checked there: every cell builds and trains 2 steps on mock data (`check_all.txt`).", ""]
  out.write_text("\n".join(head + body[:-1]) + "\n")
  return done


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pair", help="TEACHER-STUDENT, e.g. resnet32x4-resnet8x4")
  parser.add_argument("--method", help=f"one of {', '.join(crd.METHODS)} (or vanilla)")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--runs", default="runs/cifar100", help="where the runs live")
  parser.add_argument("--data_dir", default=None, help="TFDS data directory with cifar100 prepared")
  parser.add_argument("--out", default=None, help="results file (default: results.md here; RUNS/results.md with --mock)")
  parser.add_argument("--report-only", action="store_true")
  parser.add_argument("--mock", action="store_true", help="2 steps on tfds.testing.mock_data (checks this script)")
  args = parser.parse_args(argv)
  runs = pathlib.Path(args.runs).absolute()
  out = pathlib.Path(args.out) if args.out else (runs / "results.md" if args.mock else HERE / "results.md")
  if not args.report_only:
    if not args.pair or not args.method:
      parser.error("give --pair and --method (or --report-only)")
    try:
      teacher, student, method = crd.parse_variant(f"{args.pair}-{args.method}")
    except ValueError as e:
      parser.error(str(e))
    if args.seeds < 1:
      parser.error("--seeds must be >= 1")
    if args.mock:
      import tensorflow_datasets as tfds
      with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        run_cell(args, teacher, student, method)
    else:
      from kdlab.data.sources import tfds_prepared
      if not tfds_prepared("cifar100", args.data_dir):
        print(f"run.py: error: CIFAR-100 is not prepared for TFDS under {args.data_dir or 'the default data dir'}; "
              f"prepare it on a machine with network (tfds.builder('cifar100').download_and_prepare()) and pass "
              f"--data_dir", file=sys.stderr)
        return 2
      run_cell(args, teacher, student, method)
  if args.mock:
    runs.mkdir(parents=True, exist_ok=True)
  done = write_results(runs, out, args.mock, args.runs)
  print(f"wrote {out} ({done} cells with finished runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
