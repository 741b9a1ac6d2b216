"""Tokens/s of KV-cached vs uncached generation for the ``lm_pysrc`` student.

Model: ``create("gpt", vocab_size=256, d_model=128, num_layers=2, num_heads=4, mlp_ratio=4)``, the
student of configs/lm_pysrc.py, with ``max_len=512`` (the student trains at 128 tokens; RoPE has
no position table, so ``max_len`` only bounds the length and the parameters are the same).
Randomly initialized: the time per token does not depend on the weights. Batch 16, prompts of
``--prompt-len`` random bytes, ``--new`` new tokens sampled at temperature 1.

Rows, all jitted, tokens sampled with the same keys:
  cached             ``kdlab.generate(...)``: prefill, then a ``lax.scan`` of one-token cached decode
                     steps.
  uncached           ``kdlab.generate(..., use_cache=False)``: a ``lax.scan`` whose every step runs the
                     model on the whole ``[B, P + N]`` window (static shapes).
  uncached, growing  not part of kdlab, a stronger baseline: a Python loop over a jitted forward on
                     the sequence so far only, its length rounded up to a multiple of 32 (one
                     compilation per length bucket), the next token sampled inside the jit.

Each row is compiled and run once (warm-up; its compile time is reported), then the rows take
turns for ``--rounds`` rounds so that load changes hit them alike; the table gives medians. The
1-minute load average is sampled every second during the timed rounds.

Run (the figures in benchmarks/generate.md):
  .venv/bin/python benchmarks/generate.py --write
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kdlab  # noqa: E402
import kdlab.models.gpt  # noqa: E402,F401  (registers "gpt")
from kdlab.sampling import sample_logits  # noqa: E402
from kdlab.models import registry  # noqa: E402
from kdlab.repro import cpu_name  # noqa: E402

BUCKET = 32


@functools.partial(jax.jit, static_argnames=("graphdef", "width"), donate_argnames=("tokens",))
def _grow_step(graphdef, state, tokens, row_keys, length, step, *, width):
  """Samples the token at ``length`` from the model run on ``tokens[:, :width]``."""
  model = nnx.merge(graphdef, state)
  _, feats = model(tokens[:, :width], train=False)  # the unused logits are dead code
  h = jax.lax.dynamic_index_in_dim(feats["final"], length - 1, axis=1, keepdims=False)
  logits = jnp.matmul(h, model.unembedding(), preferred_element_type=jnp.float32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
  token = sample_logits(logits, keys, temperature=1.0)
  return jax.lax.dynamic_update_slice(tokens, token[:, None], (0, length))


def growing_window(model: nnx.Module, prompts: np.ndarray, max_new_tokens: int, key: jax.Array) -> jax.Array:
  """Uncached generation on the sequence so far (its length rounded up to ``BUCKET``), with the
  keys ``kdlab.generate`` uses, so the tokens agree up to float rounding."""
  graphdef, state = nnx.split(model)
  b, p = prompts.shape
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(b))
  tokens = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompts)
  for i in range(max_new_tokens):
    width = min(-(-(p + i) // BUCKET) * BUCKET, p + max_new_tokens)
    tokens = _grow_step(graphdef, state, tokens, row_keys, jnp.int32(p + i), jnp.int32(i), width=width)
  return tokens


class LoadSampler:
  """Samples the 1-minute load average every second in a background thread."""

  def __init__(self):
    self.samples: list[float] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(1.0):
      self.samples.append(os.getloadavg()[0])

  def __enter__(self):
    self.samples.append(os.getloadavg()[0])
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.samples.append(os.getloadavg()[0])


def machine() -> str:
  dev = jax.devices()[0]
  return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; jax {jax.__version__} on "
          f"{dev.platform} ({dev.device_kind}); Python {platform.python_version()}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new", type=int, default=256, help="new tokens per prompt")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--skip-growing", action="store_true", help="leave out the growing-window baseline")
  parser.add_argument("--write", action="store_true", help="write benchmarks/generate.md")
  args = parser.parse_args()

  model = registry.create("gpt", seed=0, vocab_size=256, d_model=128, num_layers=2, num_heads=4, max_len=512,
                          mlp_ratio=4, tie_embeddings=True, norm="rms")
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 1, 256), np.int32)
  key = jax.random.key(2)
  kw = dict(max_new_tokens=args.new, temperature=1.0, key=key)
  rows: dict[str, Callable[[], jax.Array]] = {
      "cached (kdlab.generate)": lambda: kdlab.generate(model, prompts, **kw).tokens,
      "uncached, full window (use_cache=False)": lambda: kdlab.generate(model, prompts, use_cache=False, **kw).tokens,
  }
  if not args.skip_growing:
    rows["uncached, growing window (benchmark only)"] = lambda: growing_window(model, prompts, args.new, key)

  compile_s, outputs = {}, {}
  for name, fn in rows.items():
    start = time.perf_counter()
    outputs[name] = np.asarray(jax.block_until_ready(fn()))
    compile_s[name] = time.perf_counter() - start  # the first call: tracing, compilation and one run
    print(f"warm-up {name}: {compile_s[name]:.1f} s", flush=True)
  reference = outputs["cached (kdlab.generate)"][:, args.prompt_len:]
  agree = {name: float(np.mean(out[:, args.prompt_len:] == reference)) for name, out in outputs.items()}

  times: dict[str, list[float]] = {name: [] for name in rows}
  with LoadSampler() as load:
    for r in range(args.rounds):
      for name, fn in rows.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - start)
      print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{t[-1]:.2f} s" for t in times.values()), flush=True)

  new_tokens = args.batch * args.new
  cached = statistics.median(times["cached (kdlab.generate)"])
  lines = ["| generation | median s | min-max s | tokens/s | ms per step | cached speed-up | "
           "first call s | tokens equal to cached |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, ts in times.items():
    med = statistics.median(ts)
    lines.append(f"| {name} | {med:.3f} | {min(ts):.3f}-{max(ts):.3f} | {new_tokens / med:,.0f} | "
                 f"{1000 * med / args.new:.2f} | {med / cached:.1f}x | {compile_s[name]:.1f} | "
                 f"{100 * agree[name]:.2f}% |")
  table = "\n".join(lines)
  loads = sorted(load.samples)
  load_line = (f"1-minute load average during the timed rounds: {loads[0]:.2f} to {loads[-1]:.2f} "
               f"(median {statistics.median(loads):.2f}, {len(loads)} samples)")
  command = ".venv/bin/python benchmarks/generate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  print()
  print(table)
  print(load_line)
  if args.write:
    work = (args.prompt_len + args.new / 2 + BUCKET / 2) / (args.prompt_len + args.new)
    text = f"""# Generation: KV-cached vs uncached

`benchmarks/generate.py`: {args.batch} prompts of {args.prompt_len} random bytes, {args.new} new tokens each
({new_tokens:,} tokens per generation), sampled at temperature 1, by the `lm_pysrc` student architecture
(gpt: vocab 256, d_model 128, 2 layers, 4 heads, MLP 4x, tied embeddings; `max_len=512` so that
{args.prompt_len} + {args.new} tokens fit, the student itself trains on 128-token sequences) with random
weights. Times are the whole jitted call (prefill included) after a warm-up call, medians of
{args.rounds} rounds in which the rows take turns. "first call" is the warm-up: tracing,
compilation and one run. "tokens equal to cached": share of the generated tokens identical to the
cached row's (same keys; the paths differ only in float rounding).

- **cached**: `kdlab.generate` (prefill, then a `lax.scan` of one-token decode steps over the KV cache).
- **uncached, full window**: `kdlab.generate(..., use_cache=False)`: each step reruns the model on the
  whole `[{args.batch}, {args.prompt_len + args.new}]` window (static shapes inside one `lax.scan`).
- **uncached, growing window**: benchmark-only baseline, a Python loop over a jitted forward on the
  sequence so far, rounded up to a multiple of {BUCKET} tokens; it does about {work:.2f} of the full
  window's work.

Machine: {machine()}.
{load_line}.

Command: `{command}`

{table}
"""
    with open(os.path.join(ROOT, "benchmarks", "generate.md"), "w") as f:
      f.write(text)
    print("wrote benchmarks/generate.md")


if __name__ == "__main__":
  main()
