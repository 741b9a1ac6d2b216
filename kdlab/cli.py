"""``kdlab train | sweep | report | cache-teacher | sample | generate-data`` (also ``python -m kdlab``).

  kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/kd [--config.FIELD=VALUE ...] [--no-wandb]
  kdlab sweep --config=FILE[:VARIANT] --sweep=experiments/NAME.py --workdir=DIR [--parallel N] [--no-wandb]
      [--config.FIELD=VALUE ...]      (docs/sweeps.md)
  kdlab report DIR                    (a sweep's or a run's workdir -> DIR/report.md with PNG plots)
  kdlab cache-teacher --config=FILE[:VARIANT] --out=DIR [--shard-size N] [--config.FIELD=VALUE ...]
      (config.teachers[0]'s top-k outputs over the train split; docs/procedures.md)
  kdlab sample --workdir=RUN --prompt=TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
      [--seed S]                      (continue TEXT with a finished LM run's student; docs/generation.md)
  kdlab generate-data --config=FILE[:VARIANT] --out=DIR [--config.FIELD=VALUE ...]
      (config.teachers[0]'s continuations of the training prompts, for sequence-level KD; docs/generation.md)

Bad input prints one line ``kdlab: error: ...`` naming the field and the fix,
exits with status 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kdlab.errors import UserError

TRAIN_EPILOG = """\
--config=FILE.py[:VARIANT,OPTION=VALUE,...]
  FILE.py defines get_config(arg); the text after ':' is its arg: a variant and options, e.g.
  configs/hinton_mnist.py:kd,source=digits,quick (each config file's docstring lists its own).
--config.FIELD=VALUE (any number of them)
  overrides one field of the loaded config; FIELD is dotted with list indices and VALUE is a Python
  literal, e.g. --config.objective[1].temperature=8 --config.teachers[0].init=runs/teacher/checkpoints

example:
  .venv/bin/kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/kd \\
      --config.teachers[0].init=runs/teacher/checkpoints --config.objective[1].temperature=8
"""


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab.train.loop import train
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  from kdlab.train.tasks import describe_summary
  summary = train(config, args.workdir, use_wandb=not args.no_wandb, progress=not args.no_progress)
  print(f"{describe_summary(summary)}; summary in {args.workdir}/summary.json")


def _sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from kdlab import sweep
  failed = sweep.run_sweep(args.config, args.sweep, args.workdir, overrides, parallel=args.parallel,
                           use_wandb=not args.no_wandb, worker=args.worker)
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


def _cache_teacher(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab.offline import cache_teacher
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  meta, built = cache_teacher.cache_teacher(config, args.out, shard_size=args.shard_size,
                                            progress=not args.no_progress, config_spec=args.config)
  what = "built" if built else "already exists (same fingerprint), kept"
  print(f"teacher cache {what}: {meta['num_sequences']} sequences x {meta['seq_len']} tokens, top "
        f"{meta['k']} of {meta['vocab_size']}, in {args.out}")


def _sample(args: argparse.Namespace, rest: Sequence[str]) -> None:
  from kdlab.offline import sample
  if rest:
    raise UserError(f"unexpected argument {rest[0]!r}; see kdlab sample --help")
  print(sample.continuation(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))


def _generate_data(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab.offline import generate_data
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  meta, built = generate_data.generate_data(config, args.out, progress=not args.no_progress, config_spec=args.config)
  what = "built" if built else "already exists (same fingerprint), kept"
  print(f"generated data {what}: {meta['num_sequences']} sequences, {meta['max_new_tokens']} teacher tokens after "
        f"{meta['prompt_len']}-token prompts, in {args.out} (train on it with "
        f"config.data.source='generated:{args.out}')")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="kdlab", description="JAX knowledge-distillation research framework")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train one run (resumes if WORKDIR has a checkpoint)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
  train.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
  train.add_argument("--workdir", required=True, help="run directory (config, metrics, checkpoints, summary)")
  train.add_argument("--no-wandb", "--nowandb", dest="no_wandb", action="store_true",
                     help="disable W&B logging (offline by default)")
  train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  sweep = commands.add_parser("sweep", help="train every run of a sweep file (resumes; skips finished runs)")
  sweep.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT], the base of every run")
  sweep.add_argument("--sweep", required=True, help="experiments/NAME.py[:ARG] defining get_sweep() (docs/sweeps.md)")
  sweep.add_argument("--workdir", required=True, help="sweep directory: one sub-workdir per run, results.{csv,md}")
  sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="train in N worker processes")
  sweep.add_argument("--no-wandb", "--nowandb", dest="no_wandb", action="store_true",
                     help="disable W&B logging (offline by default)")
  sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # A --parallel worker process.
  report = commands.add_parser("report", help="report.md with plots for a sweep or a single run directory")
  report.add_argument("workdir", metavar="DIR", help="a sweep's --workdir or one run's workdir")
  cache = commands.add_parser("cache-teacher", help="store config.teachers[0]'s top-k outputs over the train split")
  cache.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT] (teacher, data, teacher_cache_k)")
  cache.add_argument("--out", required=True, help="cache directory (new, or an interrupted build to finish)")
  cache.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=1024, metavar="N", help="sequences per shard file")
  cache.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  sample = commands.add_parser("sample", help="continue a text prompt with a finished language-model run")
  sample.add_argument("--workdir", required=True, help="a finished LM run's directory (config.json, checkpoints/)")
  sample.add_argument("--prompt", required=True, help="the text to continue (may be empty)")
  sample.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None, metavar="N",
                      help="bytes to generate (default: the rest of the model's context)")
  sample.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
  sample.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, metavar="K", help="sample among the K likeliest")
  sample.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None, metavar="P", help="nucleus sampling, 0 < P <= 1")
  sample.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
  gen_data = commands.add_parser("generate-data", help="store config.teachers[0]'s continuations of the training "
                                                       "prompts (sequence-level KD data)")
  gen_data.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT] (teachers, data, generate_data)")
  gen_data.add_argument("--out", required=True, help="dataset directory (new, or the same dataset to keep)")
  gen_data.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args, rest = parser.parse_known_args(argv)
  try:
    if args.command == "train":
      _train(args, rest)
    elif args.command == "sweep":
      return _sweep(args, rest)
    elif args.command == "report":
      _report(args, rest)
    elif args.command == "cache-teacher":
      _cache_teacher(args, rest)
    elif args.command == "sample":
      _sample(args, rest)
    elif args.command == "generate-data":
      _generate_data(args, rest)
  except UserError as e:
    print(f"kdlab: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
