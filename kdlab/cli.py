"""``kdlab train | sweep | report | cache-teacher`` (also ``python -m kdlab``).

  kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/kd [--config.FIELD=VALUE ...] [--nowandb]
  kdlab sweep --config=FILE[:VARIANT] --sweep=experiments/NAME.py --workdir=DIR [--parallel N] [--nowandb]
      [--config.FIELD=VALUE ...]      (docs/sweeps.md)
  kdlab report DIR                    (a sweep's or a run's workdir -> DIR/report.md with PNG plots)

Bad input prints one line ``kdlab: error: ...`` naming the field and the fix,
exits with status 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kdlab.errors import UserError


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab.train.loop import train
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  summary = train(config, args.workdir, use_wandb=not args.nowandb, progress=not args.no_progress)
  print(f"test accuracy {summary['test_accuracy']:.4f} ({summary['test_errors']} errors of "
        f"{summary['test_examples']}); summary in {args.workdir}/summary.json")


def _sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from kdlab import sweep
  failed = sweep.run_sweep(args.config, args.sweep, args.workdir, overrides, parallel=args.parallel,
                           use_wandb=not args.nowandb, worker=args.worker)
  if failed:
    print(f"kdlab: error: {len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and rerun the same "
          f"command to resume", file=sys.stderr)
    return 1
  return 0


def _report(args: argparse.Namespace, rest: Sequence[str]) -> None:
  from kdlab import report
  if rest:
    raise UserError(f"unexpected argument {rest[0]!r}; usage: kdlab report DIR")
  print(f"report in {report.report(args.workdir)}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="kdlab", description="JAX knowledge-distillation research framework")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train one run (resumes if WORKDIR has a checkpoint)")
  train.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
  train.add_argument("--workdir", required=True, help="run directory (config, metrics, checkpoints, summary)")
  train.add_argument("--nowandb", action="store_true", help="disable W&B logging (offline by default)")
  train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  sweep = commands.add_parser("sweep", help="train every run of a sweep file (resumes; skips finished runs)")
  sweep.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT], the base of every run")
  sweep.add_argument("--sweep", required=True, help="experiments/NAME.py[:ARG] defining get_sweep() (docs/sweeps.md)")
  sweep.add_argument("--workdir", required=True, help="sweep directory: one sub-workdir per run, results.{csv,md}")
  sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="train in N worker processes")
  sweep.add_argument("--nowandb", action="store_true", help="disable W&B logging (offline by default)")
  sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # A --parallel worker process.
  report = commands.add_parser("report", help="report.md with plots for a sweep or a single run directory")
  report.add_argument("workdir", metavar="DIR", help="a sweep's --workdir or one run's workdir")
  args, rest = parser.parse_known_args(argv)
  try:
    if args.command == "train":
      _train(args, rest)
    elif args.command == "sweep":
      return _sweep(args, rest)
    elif args.command == "report":
      _report(args, rest)
  except UserError as e:
    print(f"kdlab: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
