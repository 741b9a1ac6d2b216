"""``kdlab train | sweep | report | cache-teacher | sample | generate-data | plan | export`` (also ``python -m kdlab``).

  kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/kd [--config.FIELD=VALUE ...] [--no-wandb]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed]  (docs/clusters.md)
  kdlab sweep --config=FILE[:VARIANT] --sweep=experiments/NAME.py --workdir=DIR [--parallel N] [--no-wandb]
      [--config.FIELD=VALUE ...] [--launcher=slurm --slurm_nodes N --slurm_time_min M ...]
                                      (docs/sweeps.md, docs/clusters.md)
  kdlab report DIR                    (a sweep's or a run's workdir -> DIR/report.md with PNG plots)
  kdlab cache-teacher --config=FILE[:VARIANT] --out=DIR [--shard-size N] [--config.FIELD=VALUE ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed]
      (config.teachers[0]'s top-k outputs over the train split; docs/procedures.md)
  kdlab sample --workdir=RUN --prompt=TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
      [--seed S]                      (continue TEXT with a finished LM run's student; docs/generation.md)
  kdlab generate-data --config=FILE[:VARIANT] --out=DIR [--config.FIELD=VALUE ...]
      (config.teachers[0]'s continuations of the training prompts, for sequence-level KD; docs/generation.md)
  kdlab plan --config=FILE[:VARIANT] [--devices N] [--device-memory 80GiB] [--json] [--config.FIELD=VALUE ...]
      (per-device memory of the run, nothing allocated; docs/sharding.md)
  kdlab export --workdir=RUN --out=DIR [--step N]
      (the run's student as a Hugging Face directory: config.json, safetensors, tokenizer; docs/pretrained.md)

Bad input prints one line ``kdlab: error: ...`` naming the field and the fix,
exits with status 2, and writes nothing. A run that diverges prints one such line naming its last
good checkpoint and exits with status 1. SIGINT and SIGTERM stop a run at the end of a step with
a checkpoint there, print one line saying where, and exit with 130 / 143 (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kdlab.errors import UserError
from kdlab.train import stopping

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
  cluster = _cluster(args)
  if cluster is None:
    config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
    summary = _train_config(config, args)
  else:  # Every process checks its input; all of them stop with the same line if one finds it bad.
    from kdlab import distributed
    distributed.initialize(cluster)
    try:
      config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
      summary = _train_config(config, args)
    except UserError as e:
      distributed.agree(e)
      raise
    if not distributed.is_writer():
      return
  from kdlab.train.tasks import describe_summary
  print(f"{describe_summary(summary)}; summary in {args.workdir}/summary.json")


def _train_config(config, args: argparse.Namespace) -> dict:
  from kdlab.train.loop import train
  return train(config, args.workdir, use_wandb=not args.no_wandb, progress=not args.no_progress)


def _cluster(args: argparse.Namespace):
  """The processes this one joins (``--coordinator_address`` ... or ``--distributed``), or None."""
  from kdlab import distributed
  return distributed.cluster_from(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed, timeout_s=args.distributed_timeout)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
  """Multi-process flags (JAX's names; docs/clusters.md)."""
  group = parser.add_argument_group("several processes (one per host; docs/clusters.md)")
  group.add_argument("--coordinator_address", "--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's host and a free port (or $JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--num_processes", "--num-processes", type=int, default=None, metavar="N",
                     help="how many processes the run has (or $JAX_NUM_PROCESSES)")
  group.add_argument("--process_id", "--process-id", type=int, default=None, metavar="I",
                     help="this process's index, 0 .. N-1 (or $JAX_PROCESS_ID)")
  group.add_argument("--distributed", action="store_true",
                     help="join the processes JAX detects itself (TPU pod slices, SLURM, Open MPI)")
  group.add_argument("--distributed_timeout", "--distributed-timeout", type=float, default=None, metavar="S",
                     help="seconds to wait for the others at start-up, and for a silent process before "
                          "stopping (default 120)")


def _sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from kdlab import sweep
  slurm = {name: getattr(args, f"slurm_{name}") for name in SLURM_FLAGS}
  failed = sweep.run_sweep(args.config, args.sweep, args.workdir, overrides, parallel=args.parallel,
                           use_wandb=not args.no_wandb, worker=args.worker, launcher=args.launcher, slurm=slurm,
                           timeout_s=args.distributed_timeout)
  if failed:
    print(f"kdlab: error: {len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and rerun the same "
          f"command to resume", file=sys.stderr)
    return 1
  return 0


SLURM_FLAGS = ("nodes", "gpus_per_node", "cpus_per_task", "time_min", "partition", "mem_gb")


def _report(args: argparse.Namespace, rest: Sequence[str]) -> None:
  from kdlab import report
  if rest:
    raise UserError(f"unexpected argument {rest[0]!r}; usage: kdlab report DIR")
  print(f"report in {report.report(args.workdir)}")


def _cache_teacher(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab import distributed
  from kdlab.offline import cache_teacher
  cluster = _cluster(args)
  if cluster is not None:  # Each process writes its rows' shards; all stop with the same line if one finds bad input.
    distributed.initialize(cluster)
  try:
    config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
    meta, built = cache_teacher.cache_teacher(config, args.out, shard_size=args.shard_size,
                                              progress=not args.no_progress, config_spec=args.config)
  except UserError as e:
    if cluster is not None:
      distributed.agree(e)
    raise
  if not distributed.is_writer():
    return
  what = "built" if built else "already exists (same fingerprint), kept"
  print(f"teacher cache {what}: {meta['num_sequences']} sequences x {meta['seq_len']} tokens, top "
        f"{meta['k']} of {meta['vocab_size']}, in {args.out}; {meta['bytes_per_token']:.1f} bytes per token "
        f"({meta['bytes_per_entry']:g} per kept entry), reconstruction KL {meta['reconstruction_kl']:.2e} nats "
        f"per token")


def _sample(args: argparse.Namespace, rest: Sequence[str]) -> None:
  from kdlab.offline import sample
  if rest:
    raise UserError(f"unexpected argument {rest[0]!r}; see kdlab sample --help")
  print(sample.continuation(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))


def _plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  import json
  import os
  import subprocess
  if args.devices is not None and args.devices < 1:
    raise UserError(f"--devices={args.devices}: use a whole number >= 1")
  if args.device_memory is not None:
    from kdlab.offline.plan import parse_bytes  # (loads JAX; fine, planning needs it)
    parse_bytes(args.device_memory)
  if args.devices is not None and os.environ.get("KDLAB_PLAN_DEVICES") != str(args.devices):
    # JAX fixes its device count at import: plan in a child with N simulated CPU devices.
    env = dict(os.environ, KDLAB_PLAN_DEVICES=str(args.devices), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}")
    return subprocess.run([sys.executable, "-m", "kdlab", *sys.argv[1:]] if args.argv is None
                          else [sys.executable, "-m", "kdlab", *args.argv], env=env).returncode
  from kdlab import config as kconfig
  from kdlab.offline import plan
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  memory = None if args.device_memory is None else plan.parse_bytes(args.device_memory)
  result = plan.plan(config, device_memory=memory)
  print(json.dumps(result, indent=2) if args.json else plan.format_plan(result))
  return 0 if result["fits"] in (None, True) else 1


def _export(args: argparse.Namespace, rest: Sequence[str]) -> None:
  from kdlab.offline import export
  if rest:
    raise UserError(f"unexpected argument {rest[0]!r}; see kdlab export --help")
  if args.step is not None and args.step < 0:
    raise UserError(f"--step={args.step}: use a checkpoint's step (>= 0)")
  print(export.describe(export.export(args.workdir, args.out, step=args.step)))


def _generate_data(args: argparse.Namespace, overrides: Sequence[str]) -> None:
  from kdlab import config as kconfig
  from kdlab.offline import generate_data
  config = kconfig.apply_overrides(kconfig.load(args.config), overrides)
  meta, built = generate_data.generate_data(config, args.out, progress=not args.no_progress, config_spec=args.config)
  what = "built" if built else "already exists (same fingerprint), kept"
  if meta.get("segments"):  # instruction examples: prompts of their own lengths, replies end at a stop token
    tokens = f"up to {meta['max_new_tokens']} teacher tokens after prompts of up to {meta['prompt_len']} tokens"
  else:
    tokens = f"{meta['max_new_tokens']} teacher tokens after {meta['prompt_len']}-token prompts"
  print(f"generated data {what}: {meta['num_sequences']} sequences, {tokens}, in {args.out} (train on it with "
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
  _add_cluster_flags(train)
  sweep = commands.add_parser("sweep", help="train every run of a sweep file (resumes; skips finished runs)")
  sweep.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT], the base of every run")
  sweep.add_argument("--sweep", required=True, help="experiments/NAME.py[:ARG] defining get_sweep() (docs/sweeps.md)")
  sweep.add_argument("--workdir", required=True, help="sweep directory: one sub-workdir per run, results.{csv,md}")
  sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="train in N worker processes")
  sweep.add_argument("--no-wandb", "--nowandb", dest="no_wandb", action="store_true",
                     help="disable W&B logging (offline by default)")
  sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # A --parallel worker process.
  cluster = sweep.add_argument_group("cluster launch (docs/clusters.md)")
  cluster.add_argument("--launcher", default="local", choices=("local", "slurm", "submitit-local"),
                       help="local: train here (default); slurm: submit the runs as a SLURM job array (submitit); "
                            "submitit-local: the same job array through submitit's local executor")
  for name, kind, text in (("nodes", int, "nodes per run (several: a multi-host run)"),
                           ("gpus_per_node", int, "GPUs per node"), ("cpus_per_task", int, "CPUs per task"),
                           ("time_min", int, "time limit of each run's job, in minutes"),
                           ("partition", str, "SLURM partition"), ("mem_gb", int, "memory per node, GB")):
    cluster.add_argument(f"--slurm_{name}", f"--slurm-{name.replace('_', '-')}", type=kind, default=None,
                         metavar="N" if kind is int else "NAME", help=f"{text} (else the sweep's slurm entry)")
  cluster.add_argument("--distributed_timeout", "--distributed-timeout", type=float, default=None, metavar="S",
                       help="multi-node runs: seconds to wait for a silent process (default 120)")
  report = commands.add_parser("report", help="report.md with plots for a sweep or a single run directory")
  report.add_argument("workdir", metavar="DIR", help="a sweep's --workdir or one run's workdir")
  cache = commands.add_parser("cache-teacher", help="store config.teachers[0]'s top-k outputs over the train split")
  cache.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT] (teacher, data, teacher_cache_k)")
  cache.add_argument("--out", required=True, help="cache directory (new, or an interrupted build to finish)")
  cache.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=1024, metavar="N", help="sequences per shard file")
  cache.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  _add_cluster_flags(cache)
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
  plan = commands.add_parser("plan", help="per-device memory of a run, from abstract shapes and the compiled "
                                         "step (nothing allocated; no checkpoint needed)")
  plan.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]; teachers may give model=dict(...) "
                                                   "without a checkpoint")
  plan.add_argument("--devices", type=int, default=None, metavar="N",
                    help="plan for N devices (simulated CPU devices when not this machine's count)")
  plan.add_argument("--device-memory", "--device_memory", dest="device_memory", default=None, metavar="BYTES",
                    help="memory of one device, e.g. 80GiB: say whether the run fits (exit 1 if not)")
  plan.add_argument("--json", action="store_true", help="print the plan as JSON")
  exp = commands.add_parser("export", help="write a finished run's student as a Hugging Face directory "
                                           "(config.json, safetensors, tokenizer files)")
  exp.add_argument("--workdir", required=True, help="a run whose student is llama, qwen2, qwen3 or gemma3")
  exp.add_argument("--out", required=True, help="the new folder to write (must not exist or be empty)")
  exp.add_argument("--step", type=int, default=None, metavar="N", help="the checkpoint to export (default: the latest)")
  args, rest = parser.parse_known_args(argv)
  args.argv = None if argv is None else list(argv)
  try:
    with stopping.raising():
      return _run(args, rest)
  except UserError as e:
    print(f"kdlab: error: {e}", file=sys.stderr)
    return 2
  except stopping.Diverged as e:
    print(f"kdlab: error: {e}", file=sys.stderr)
    return 1
  except stopping.Interrupted as e:
    print(f"kdlab: {e}", file=sys.stderr)
    return e.exit_status
  except Exception as e:  # A full disk is no bug of kdlab's: one line, not a traceback.
    path = stopping.disk_full(e)
    if path is None:
      raise
    print(f"kdlab: error: {stopping.disk_full_line(path)}", file=sys.stderr)
    import logging  # The failed save's other writes are reported when collected at exit: said above already.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return 1


def _run(args: argparse.Namespace, rest: Sequence[str]) -> int:
  """Runs the command ``args.command``; returns the exit status."""
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
  elif args.command == "export":
    _export(args, rest)
  elif args.command == "plan":
    return _plan(args, rest)
  return 0


if __name__ == "__main__":
  sys.exit(main())
