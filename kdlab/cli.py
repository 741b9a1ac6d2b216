"""``kdlab train | sweep | report | cache-teacher`` (also ``python -m kdlab``).

  kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/kd [--config.FIELD=VALUE ...] [--nowandb]

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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="kdlab", description="JAX knowledge-distillation research framework")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train one run (resumes if WORKDIR has a checkpoint)")
  train.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
  train.add_argument("--workdir", required=True, help="run directory (config, metrics, checkpoints, summary)")
  train.add_argument("--nowandb", action="store_true", help="disable W&B logging (offline by default)")
  train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args, rest = parser.parse_known_args(argv)
  try:
    if args.command == "train":
      _train(args, rest)
  except UserError as e:
    print(f"kdlab: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
