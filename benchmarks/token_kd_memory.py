"""Peak memory and time of token-level KD at large vocabularies: plain vs chunked vs fused.

Each (vocab, method) runs in its own process. The measured step is forward + backward of
``mean_b loss_b`` w.r.t. the student's final hidden states ``[B, L, D]`` and unembedding
``[D, V]``, jitted, with the teacher's hidden states and unembedding as fixed inputs:

  plain        token_loss(kd, s_h @ s_w, t_h @ t_w, mask): full [B, L, V] logits and probabilities
  chunked      chunked_token_kd(s_h @ s_w, t_h @ t_w, mask): full logits, chunked probabilities
  fused        fused_token_kd(s_h, s_w, t_h, t_w, mask): no full logits, forward or backward
  fused_remat  reference only (not in kdlab): the same chunks with lax.map + jax.checkpoint,
               whose backward recomputes the chunk's logits (what fused avoids)

Reported per configuration: median step time over ``--repeats`` runs after one warm-up, as wall
time and as the process's CPU time (all threads; steadier than wall time on a shared machine); the
process's peak resident memory while running the compiled step (VmHWM, reset after the inputs
are made and the step compiled; it includes the jax runtime, about 0.3 GiB, and the inputs);
the same net of the runtime and inputs (what the loss computation itself adds: its
intermediates and the gradients); and XLA's own buffer estimate (arguments + outputs +
temporaries). A configuration whose XLA estimate exceeds ``--mem-limit-gb`` is not run
("exceeds"); one that crashes or runs past ``--timeout`` is reported as such.

Run (the figures in token_kd_memory.md):
  python benchmarks/token_kd_memory.py --vocabs 32768 --methods plain,chunked,fused,fused_remat
  python benchmarks/token_kd_memory.py --vocabs 131072,262144 --mem-limit-gb 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("plain", "chunked", "fused", "fused_remat")


def _vm(field: str) -> int:
  """A /proc/self/status field (VmHWM, VmRSS) in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return -1


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs), so the peak measured covers
  the step alone, not the inputs' generation or the compilation."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(args: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, ROOT)
  from kdlab.losses import fused_head, sequence

  jax.block_until_ready(jnp.zeros(8) + 1)
  rss_runtime = _vm("VmRSS")  # the jax runtime alone

  b, l, d, v = args.batch, args.length, args.d_model, args.vocab
  k = jax.random.split(jax.random.key(0), 4)
  # Hidden states of unit scale and 1/sqrt(D) unembeddings: logits of order 1, as in a real LM.
  s_h = jax.random.normal(k[0], (b, l, d), jnp.float32)
  t_h = jax.random.normal(k[1], (b, l, d), jnp.float32)
  s_w = jax.random.normal(k[2], (d, v), jnp.float32) / d**0.5
  t_w = 2.0 * jax.random.normal(k[3], (d, v), jnp.float32) / d**0.5
  mask = jnp.ones((b, l), jnp.float32)
  hp = dict(divergence=args.divergence, temperature=args.temperature,
            chunk_size=args.chunk_size or None)
  div = sequence.divergence_fn(args.divergence)

  def plain(s_h, s_w, t_h, t_w, mask):
    return sequence.token_loss(div, s_h @ s_w, t_h @ t_w, mask, temperature=args.temperature)

  def chunked(s_h, s_w, t_h, t_w, mask):
    return sequence.chunked_token_kd(s_h @ s_w, t_h @ t_w, mask, **hp)

  def fused(s_h, s_w, t_h, t_w, mask):
    return fused_head.fused_token_kd(s_h, s_w, t_h, t_w, mask, **hp)

  def fused_remat(s_h, s_w, t_h, t_w, mask):
    c = max(1, (args.chunk_size or max(1, 2**24 // v)) // b)  # kdlab's default
    assert l % c == 0, "fused_remat: chunk_size // batch must divide the length"

    @jax.checkpoint
    def body(start):
      s_c = jax.lax.dynamic_slice_in_dim(s_h, start, c, axis=1)
      t_c = jax.lax.dynamic_slice_in_dim(t_h, start, c, axis=1)
      return div(s_c @ s_w, t_c @ t_w, temperature=args.temperature)

    per_token = jax.lax.map(body, jnp.arange(l // c) * c)  # [num, B, c]
    return sequence.masked_sequence_mean(jnp.moveaxis(per_token, 0, 1).reshape(b, l), mask)

  loss = {"plain": plain, "chunked": chunked, "fused": fused, "fused_remat": fused_remat}[args.method]
  step = jax.jit(jax.value_and_grad(lambda *a: loss(*a).mean(), argnums=(0, 1)))
  inputs = (s_h, s_w, t_h, t_w, mask)
  jax.block_until_ready(inputs)
  rss_inputs = _vm("VmRSS")

  t0 = time.perf_counter()
  compiled = step.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  xla_bytes = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes) if ma is not None else -1
  out = dict(vocab=v, method=args.method, compile_s=compile_s, xla_gb=xla_bytes / 2**30,
             xla_temp_gb=(ma.temp_size_in_bytes / 2**30 if ma is not None else -1),
             rss_runtime_gb=rss_runtime / 2**30, rss_inputs_gb=rss_inputs / 2**30)
  if xla_bytes > args.mem_limit_gb * 2**30:
    return dict(out, status="exceeds", note=f"XLA estimate {xla_bytes / 2**30:.1f} GiB > "
                                            f"{args.mem_limit_gb} GiB limit; not run")
  reset = _reset_peak()
  rss_before = _vm("VmRSS")  # runtime + inputs + compiled step, before it runs
  value, grads = compiled(*inputs)
  loss_value, grad_norm = float(value), float(jnp.linalg.norm(grads[1]))
  del value, grads  # a training step's peak does not hold the previous step's gradients
  times, cpu = [], []
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return dict(out, status="ok", loss=loss_value, grad_norm=grad_norm,
              median_s=statistics.median(times), times_s=times,
              cpu_s=statistics.median(cpu), cpus_s=cpu, peak_gb=_vm("VmHWM") / 2**30,
              net_gb=(_vm("VmHWM") - rss_before) / 2**30, rss_before_gb=rss_before / 2**30,
              peak_is_step_only=reset)


def run_one(args: argparse.Namespace, vocab: int, method: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--vocab", str(vocab), "--method",
         method, "--batch", str(args.batch), "--length", str(args.length), "--d-model",
         str(args.d_model), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
         "--divergence", args.divergence, "--temperature", str(args.temperature),
         "--mem-limit-gb", str(args.mem_limit_gb)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return dict(vocab=vocab, method=method, status="timeout", note=f"> {args.timeout} s")
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    killed = proc.returncode < 0 or proc.returncode == 137
    oom = killed or "RESOURCE_EXHAUSTED" in proc.stderr or "MemoryError" in proc.stderr
    return dict(vocab=vocab, method=method, status="oom" if oom else "error",
                note=f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), wall_s=wall)


def table(results: list[dict]) -> str:
  rows = ["| vocab | method | status | wall s | CPU s | peak RSS GiB | net GiB | XLA est. GiB | "
          "wall / plain | CPU / plain | peak / plain | net / plain |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  plain = {r["vocab"]: r for r in results if r["method"] == "plain" and r["status"] == "ok"}
  for r in results:
    ok, p = r["status"] == "ok", plain.get(r["vocab"])
    cells = [f"{r['vocab']:,}", r["method"], r["status"],
             f"{r['median_s']:.1f}" if ok else "-",
             f"{r['cpu_s']:.1f}" if ok else "-",
             f"{r['peak_gb']:.2f}" if ok else "-",
             f"{r['net_gb']:.2f}" if ok else "-",
             f"{r['xla_gb']:.2f}" if r.get("xla_gb", -1) >= 0 else "-",
             f"{r['median_s'] / p['median_s']:.2f}x" if ok and p else "-",
             f"{r['cpu_s'] / p['cpu_s']:.2f}x" if ok and p else "-",
             f"1/{p['peak_gb'] / r['peak_gb']:.1f}" if ok and p else "-",
             f"1/{p['net_gb'] / r['net_gb']:.1f}" if ok and p else "-"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocabs", default="32768,131072,262144", help="comma-separated vocab sizes")
  p.add_argument("--methods", default="plain,chunked,fused", help=f"comma-separated, of {METHODS}")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--chunk-size", type=int, default=0,
                 help="tokens per chunk (chunked, fused); 0: kdlab's default (~64 MiB blocks)")
  p.add_argument("--divergence", default="kd")
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
  p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
  p.add_argument("--mem-limit-gb", type=float, default=18.0,
                 help="skip a configuration whose XLA buffer estimate exceeds this")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
  p.add_argument("--method", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return
  methods = args.methods.split(",")
  for m in methods:
    if m not in METHODS:
      p.error(f"--methods: unknown {m!r}; choose from {METHODS}")
  import jax  # only for the version in the report

  results = []
  for vocab in (int(x) for x in args.vocabs.split(",")):
    for method in methods:
      r = run_one(args, vocab, method)
      results.append(r)
      print(json.dumps(r), file=sys.stderr, flush=True)
  print(f"jax {jax.__version__}, {args.batch} x {args.length} tokens, d_model {args.d_model}, "
        f"chunk {args.chunk_size}, {args.divergence} T={args.temperature}, "
        f"median of {args.repeats}\n")
  print(table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(jax=jax.__version__, args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
  main()
