"""Seeds in one compiled program vs one run per seed: throughput of the Hinton MNIST MLP student.

  .venv/bin/python benchmarks/vmap_seeds.py --seeds 8

Times the whole training loop (data pipeline, jitted step, metrics) for N1 and N2 steps and takes
the difference, so compilation, start-up and the final evaluation cancel out. "Sequential" is one
run per seed: its per-step time measured on one seed, times S. Throughput is seed-steps per second;
the fraction of the machine's fp32 matmul peak uses 6 x parameters x batch FLOPs per seed-step
(forward 2, backward 4).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
from kdlab.config import load  # noqa: E402
from kdlab.train.loop import train  # noqa: E402

CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "hinton_mnist.py")


def loop_time(steps: int, seeds: int, workdir: pathlib.Path) -> float:
  config = load(f"{CONFIG}:student")
  config.train.num_steps = steps
  config.train.eval_every_epochs = 1e6
  config.train.checkpoint_every_epochs = 1e6
  config.train.log_every_steps = 40
  config.vmap_seeds = seeds
  t0 = time.perf_counter()
  train(config, workdir, use_wandb=False, progress=False)
  return time.perf_counter() - t0


def per_step(seeds: int, n1: int, n2: int, root: pathlib.Path) -> float:
  loop_time(n1, seeds, root / f"s{seeds}_warmup")  # Fills JAX's compilation cache for both timed runs.
  t1 = loop_time(n1, seeds, root / f"s{seeds}_{n1}")
  t2 = loop_time(n2, seeds, root / f"s{seeds}_{n2}")
  return (t2 - t1) / (n2 - n1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--n1", type=int, default=100)
  parser.add_argument("--n2", type=int, default=400)
  parser.add_argument("--peak-gflops", type=float, default=134.0, help="machine fp32 matmul peak (NOTES.md)")
  args = parser.parse_args()
  config = load(f"{CONFIG}:student")
  sizes = (config.model.in_features, *config.model.hidden, config.model.num_classes)
  params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
  flops = 6 * params * config.data.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    seq = per_step(1, args.n1, args.n2, root)
    vm = per_step(args.seeds, args.n1, args.n2, root)
  seq_tput, vm_tput = 1 / seq, args.seeds / vm
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), jax {jax.__version__}; MLP {sizes}, {params:,} params, batch {config.data.batch_size}, "
        f"{flops / 1e9:.2f} GFLOP per seed-step")
  print("| mode | ms per loop step | seed-steps/s | GFLOP/s | fraction of peak |")
  print("|---|---|---|---|---|")
  for name, ms, tput in ((f"{args.seeds} sequential runs (1 seed per step)", 1e3 * seq, seq_tput),
                         (f"{args.seeds} seeds vmapped in one step", 1e3 * vm, vm_tput)):
    gf = tput * flops / 1e9
    print(f"| {name} | {ms:.1f} | {tput:.1f} | {gf:.1f} | {gf / args.peak_gflops:.0%} |")
  print(f"vmapped / sequential throughput: {vm_tput / seq_tput:.2f}x")


if __name__ == "__main__":
  main()
