"""Seeds in one compiled program vs one run per seed: throughput of the Hinton MNIST MLP student.

  .venv/bin/python benchmarks/vmap_seeds.py --seeds 8

Times the whole training loop (data pipeline, jitted step, metrics) for N1 and N2 steps and takes
the difference, so compilation, start-up and the final evaluation cancel out. "Sequential" is one
run per seed: its per-step time measured on one seed, times S. Throughput is seed-steps per second;
the fraction of the machine's fp32 matmul peak counts the matrix products' FLOPs per seed-step
(forward 2 W B, weight gradients 2 W B, input gradients 2 W B for all layers but the first; W the
weights, B the batch), against a 4096^3 float32 matmul timed in the same process.

Then the jitted step alone, without the loop, for the same MLP and batch (plain JAX, SGD with
momentum): one seed, S seeds vmapped, and S seeds unrolled in one program (a tuple of per-seed
states, so the seeds' matrix products are independent operations instead of batched ones). The one-seed
step's fraction of the peak bounds what any seeds-in-one-program scheme can gain on this device.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
from kdlab.config import load  # noqa: E402
from kdlab.repro import cpu_name  # noqa: E402
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


def matmul_peak(n: int = 4096, rounds: int = 5) -> float:
  """GFLOP/s of the best of ``rounds`` float32 ``[n, n] @ [n, n]`` products."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def step_alone(sizes: tuple[int, ...], batch: int, seeds: int, mode: str, steps: int = 40) -> float:
  """Seconds per seed-step of a jitted MLP SGD step: ``mode`` "one" (one seed), "vmap" or "unroll"."""
  tx = optax.sgd(0.05, momentum=0.9)

  def init(key):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
      key, k = jax.random.split(key)
      params.append((jax.random.normal(k, (a, b)) * (2 / a) ** 0.5, jnp.zeros((b,))))
    return params, tx.init(params)

  def loss(params, x, y):
    for i, (w, b) in enumerate(params):
      x = x @ w + b
      x = jax.nn.relu(x) if i < len(params) - 1 else x
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

  def step(state, x, y):
    params, opt = state
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), value

  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.random((seeds, batch, sizes[0]), np.float32))
  ys = jnp.asarray(rng.integers(0, sizes[-1], (seeds, batch)))
  states = [init(k) for k in jax.random.split(jax.random.key(0), seeds)]
  if mode == "one":
    f, state, per = jax.jit(step, donate_argnums=0), states[0], 1
    xs, ys = xs[0], ys[0]
  elif mode == "vmap":
    f, state, per = jax.jit(jax.vmap(step), donate_argnums=0), jax.tree.map(lambda *a: jnp.stack(a), *states), seeds
  else:
    def unrolled(states, xs, ys):
      out = [step(s, xs[i], ys[i]) for i, s in enumerate(states)]
      return tuple(o[0] for o in out), jnp.stack([o[1] for o in out])
    f, state, per = jax.jit(unrolled, donate_argnums=0), tuple(states), seeds
  for _ in range(5):
    state, _ = f(state, xs, ys)
  jax.block_until_ready(state)
  n = steps * (8 if per == 1 else 1)
  t0 = time.perf_counter()
  for _ in range(n):
    state, _ = f(state, xs, ys)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / n / per


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--n1", type=int, default=100)
  parser.add_argument("--n2", type=int, default=400)
  parser.add_argument("--peak-gflops", type=float, default=None,
                      help="fp32 matmul peak to compare against; default: measured here (4096^3 matmul)")
  args = parser.parse_args()
  config = load(f"{CONFIG}:student")
  sizes = (config.model.in_features, *config.model.hidden, config.model.num_classes)
  params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
  weights = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
  # Matrix-product FLOPs: forward and weight gradients 2 W B each, input gradients 2 W B for every layer
  # but the first (nothing needs the gradient of the images).
  flops = (6 * sum(weights) - 2 * weights[0]) * config.data.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    seq = per_step(1, args.n1, args.n2, root)
    vm = per_step(args.seeds, args.n1, args.n2, root)
  seq_tput, vm_tput = 1 / seq, args.seeds / vm
  peak = args.peak_gflops or matmul_peak()
  print(f"machine: {cpu_name()}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), jax {jax.__version__}; MLP {sizes}, {params:,} params, batch {config.data.batch_size}, "
        f"{flops / 1e9:.2f} GFLOP per seed-step; fp32 matmul peak {peak:.0f} GFLOP/s"
        f"{' (given)' if args.peak_gflops else ' (4096^3, measured now)'}")
  print("| mode | ms per loop step | seed-steps/s | GFLOP/s | fraction of peak |")
  print("|---|---|---|---|---|")
  for name, ms, tput in ((f"{args.seeds} sequential runs (1 seed per step)", 1e3 * seq, seq_tput),
                         (f"{args.seeds} seeds vmapped in one step", 1e3 * vm, vm_tput)):
    gf = tput * flops / 1e9
    print(f"| {name} | {ms:.1f} | {tput:.1f} | {gf:.1f} | {gf / peak:.0%} |")
  print(f"vmapped / sequential throughput: {vm_tput / seq_tput:.2f}x")
  print()
  print("The jitted step alone (no loop):")
  print("| step | ms per seed-step | GFLOP/s | fraction of peak |")
  print("|---|---|---|---|")
  alone = {}
  for mode, name in (("one", "one seed"), ("vmap", f"{args.seeds} seeds vmapped"),
                     ("unroll", f"{args.seeds} seeds unrolled in one program")):
    alone[mode] = step_alone(sizes, config.data.batch_size, args.seeds, mode)
    gf = flops / alone[mode] / 1e9
    print(f"| {name} | {1e3 * alone[mode]:.2f} | {gf:.1f} | {gf / peak:.0%} |")
  bound = peak / (flops / alone["one"] / 1e9)
  print(f"One seed's step already runs at {1 / bound:.0%} of the peak: no program doing the same work can be more "
        f"than {bound:.2f}x faster per seed-step here (vmapped {alone['one'] / alone['vmap']:.2f}x, "
        f"unrolled {alone['one'] / alone['unroll']:.2f}x the one-seed step).")


if __name__ == "__main__":
  main()
