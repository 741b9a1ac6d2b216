"""The output head of a large-vocabulary LM on this CPU, op by op: where a 128k-vocab student step goes.

Shapes of benchmarks/llm_kd_step.py's 128,256-vocab student: ``h [2048, 256]`` hidden states (batch 4 x
512) against ``W [256, 128256]``. Times each op jitted on its own (best of 3 after a warm-up): the
unembedding matmul and the two matmuls of its gradient, a log-softmax and an argmax over the
``[2048, 128256]`` logits (1 GiB of float32), and the CE's value and gradient (h and W) as
``jax.nn.log_softmax`` + gather and as ``logsumexp`` - target logit.

  .venv/bin/python benchmarks/vocab_head_ops.py [--vocab 128256] [--tokens 2048] [--hidden 256]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workers import timed  # noqa: E402


def best_of(fn: Callable[..., Any], *args: Any, n: int = 3) -> float:
  """Seconds of the fastest of ``n`` calls of ``jit(fn)(*args)`` after a compiling call."""
  fn = jax.jit(fn)
  return min(timed(lambda: jax.block_until_ready(fn(*args)), n, warmup=1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--hidden", type=int, default=256)
  args = parser.parse_args()
  n, d, v = args.tokens, args.hidden, args.vocab
  keys = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(keys[0], (n, d), jnp.float32)
  w = jax.random.normal(keys[1], (d, v), jnp.float32) * 0.02
  y = jax.random.randint(keys[2], (n,), 0, v)
  g = jnp.ones((n, v), jnp.float32)

  def ce_log_softmax(h, w):
    return -jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), y[:, None], -1).mean()

  def ce_logsumexp(h, w):
    logits = h @ w
    return (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]).mean()

  matmul_flop = 2 * n * d * v
  rows = [
      ("logits = h @ W", best_of(lambda h, w: h @ w, h, w), matmul_flop),
      ("dh = dlogits @ W.T", best_of(lambda g, w: g @ w.T, g, w), matmul_flop),
      ("dW = h.T @ dlogits", best_of(lambda h, g: h.T @ g, h, g), matmul_flop),
      ("log_softmax(logits)", best_of(lambda x: jax.nn.log_softmax(x, -1), g), 0),
      ("argmax(logits) (train accuracy)", best_of(lambda x: jnp.argmax(x, -1), g), 0),
      ("CE value (log_softmax + gather)", best_of(ce_log_softmax, h, w), matmul_flop),
      ("CE value and gradient (log_softmax)", best_of(jax.grad(ce_log_softmax, argnums=(0, 1)), h, w), 3 * matmul_flop),
      ("CE value and gradient (logsumexp)", best_of(jax.grad(ce_logsumexp, argnums=(0, 1)), h, w), 3 * matmul_flop),
  ]
  gib = n * v * 4 / 2**30
  print(f"h [{n}, {d}], W [{d}, {v}]: logits {gib:.2f} GiB float32; jax {jax.__version__}, {jax.default_backend()}")
  print("| op | s | GFLOP/s (matmuls) | GiB/s of logits read |")
  print("|---|---:|---:|---:|")
  for name, seconds, flop in rows:
    rate = f"{flop / seconds / 1e9:.0f}" if flop else "-"
    bandwidth = "-" if flop else f"{gib / seconds:.2f}"
    print(f"| {name} | {seconds:.3f} | {rate} | {bandwidth} |")


if __name__ == "__main__":
  main()
