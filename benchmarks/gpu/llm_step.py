"""kdlab's LLM distillation step at Llama-3.1-8B teacher / Llama-3.2-1B student shapes, with its MFU.

Run by benchmarks/gpu/run.sh (which installs what a bare GPU machine lacks); ``--tiny`` runs the
same code at tiny shapes on any backend (the test suite does, on CPU).

The step is benchmarks/llm_kd_step.py's (:class:`KdlabBench`: the objective, optimizer and train
step ``kdlab train`` runs): the teacher's forward (bfloat16 parameters and compute), the student's
forward and backward (float32 master parameters, bfloat16 compute, each block rematerialized),
0.5 CE + 0.5 forward KL at T = 1 on the completion half of each sequence with the fused
large-vocabulary loss (no ``[B, L, V]`` logits), AdamW. Random weights: the time does not depend
on them.

Model FLOPs (what MFU counts, as PaLM and MaxText do): per token, ``2 N`` for a forward pass and
``6 N`` for a training step, ``N`` the parameters that multiply (the input embedding table is a
lookup, not counted; a tied table is counted once, as the output projection), plus attention's
``4 L T d`` forward / ``12 L T d`` training (``L`` layers, ``T`` the sequence length, ``d`` the
query width; no causal discount). MFU = model FLOPs / step time / the chip's peak (bfloat16 dense:
H100/H200 989 TFLOP/s; ``--peak-tflops`` for others; on CPU the measured float32 matmul rate).

Output, one ``key: value`` line each, then one ``RESULT {json}`` line with every figure:

  device              the backend's device kind and count, jax version
  teacher, student    parameter counts and shapes
  batch               rows x sequence length, tokens per step
  step_s              the whole step's median seconds over ``--steps`` steps (after one compiling step)
  tokens_per_s        tokens per second of the whole step
  mfu_step            model FLOPs of the whole step (teacher forward + student training) / time / peak
  student_step_s      the student's step alone (CE only), median seconds
  mfu_student         its model FLOPs / time / peak
  model_tflop_step    the model FLOPs of the whole step (teacher forward + student training)
  xla_tflop_step      XLA's own FLOP count of the compiled step (cost analysis), for comparison
  generate_greedy_tokens_per_s, generate_sampled_tokens_per_s
                      the student's KV-cache generation: ``--gen-batch`` prompts of ``--prompt-len``
                      tokens, ``--new-tokens`` new tokens each
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from llm_kd_step import HPARAMS, KdlabBench, kdlab_batch, matmul_peak  # noqa: E402

LLAMA3_ROPE = dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TEACHER_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, **LLAMA3_ROPE)
STUDENT_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                  **dict(LLAMA3_ROPE, rope_scaling=dict(LLAMA3_ROPE["rope_scaling"], factor=32.0)))
TINY_TEACHER = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, **LLAMA3_ROPE)
TINY_STUDENT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True, **LLAMA3_ROPE)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def matmul_params(spec: dict[str, Any]) -> int:
  """Parameters that take part in matrix multiplies: every block's projections and the output
  projection (the embedding table itself when tied)."""
  d, i, layers = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
  hd = spec.get("head_dim") or d // spec["num_attention_heads"]
  q, kv = spec["num_attention_heads"] * hd, spec["num_key_value_heads"] * hd
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * i
  return layers * per_layer + d * spec["vocab_size"]


def model_flops(spec: dict[str, Any], tokens: int, seq_len: int, train: bool) -> float:
  """Model FLOPs of ``tokens`` tokens: ``(6 | 2) N + (12 | 4) L T d`` per token."""
  hd = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
  attn = spec["num_hidden_layers"] * seq_len * spec["num_attention_heads"] * hd
  return tokens * ((6 if train else 2) * matmul_params(spec) + (12 if train else 4) * attn)


def peak_flops(device_kind: str, override: float | None) -> tuple[float, str]:
  """The device's peak in FLOP/s and where the figure comes from."""
  if override:
    return override * 1e12, "--peak-tflops"
  for name, tflops in PEAK_TFLOPS.items():
    if name in device_kind:
      return tflops * 1e12, f"{name} bfloat16 dense"
  return matmul_peak() * 1e9, "measured float32 matmul rate"


def median_time(run, steps: int) -> float:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, any backend (a smoke run)")
  parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4; tiny 2)")
  parser.add_argument("--seq-len", type=int, default=None, help="default 4096; tiny 64")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--impl", default="fused", help="the kd term's impl: fused, chunked or plain")
  parser.add_argument("--remat", default="full", help="the student's remat policy")
  parser.add_argument("--gen-batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=None, help="default 128; tiny 8")
  parser.add_argument("--new-tokens", type=int, default=None, help="default 128; tiny 8")
  parser.add_argument("--peak-tflops", type=float, default=None)
  args = parser.parse_args()
  batch = args.batch or (2 if args.tiny else 4)
  seq_len = args.seq_len or (64 if args.tiny else 4096)
  prompt_len = args.prompt_len or (8 if args.tiny else 128)
  new_tokens = args.new_tokens or (8 if args.tiny else 128)

  import jax
  from kdlab import models

  t_spec, s_spec = (TINY_TEACHER, TINY_STUDENT) if args.tiny else (TEACHER_8B, STUDENT_1B)
  max_len = max(seq_len, prompt_len + new_tokens)
  teacher = models.create("llama", seed=0, dtype="bfloat16", param_dtype="bfloat16", max_len=max_len, **t_spec)
  student = models.create("llama", seed=1, dtype="bfloat16", param_dtype="float32", remat=args.remat,
                          max_len=max_len, **s_spec)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, s_spec["vocab_size"], (batch, seq_len)).astype(np.int32)
  labels = ids.astype(np.int64)
  labels[:, : seq_len // 2] = -100
  t0 = time.perf_counter()
  bench = KdlabBench(teacher, student, kdlab_batch(ids, labels), HPARAMS, args.impl, ops=("kd", "student"))
  compile_s = time.perf_counter() - t0
  devices = jax.devices()
  kind = devices[0].device_kind
  peak, peak_from = peak_flops(kind, args.peak_tflops)
  tokens = batch * seq_len
  bench.run("kd")  # the first run of a compiled step allocates; not timed
  step_s = median_time(lambda: bench.run("kd"), args.steps)
  bench.run("student")
  student_s = median_time(lambda: bench.run("student"), args.steps)
  student_flops = model_flops(s_spec, tokens, seq_len, train=True)
  step_flops = student_flops + model_flops(t_spec, tokens, seq_len, train=False)
  prompts = rng.integers(0, s_spec["vocab_size"], (args.gen_batch, prompt_len)).astype(np.int32)
  gen = {}
  for mode in ("greedy", "sampled"):
    times = bench.generate(prompts, new_tokens, mode == "greedy", n=2, warmup=1)
    gen[mode] = args.gen_batch * new_tokens / statistics.median(times)
  result = {
      "device": f"{kind} x{len(devices)} ({jax.default_backend()}, jax {jax.__version__})",
      "teacher": f"llama {matmul_params(t_spec) / 1e9:.3f}B matmul parameters, {t_spec['num_hidden_layers']} layers, "
                 f"hidden {t_spec['hidden_size']}, bfloat16",
      "student": f"llama {matmul_params(s_spec) / 1e9:.3f}B matmul parameters, {s_spec['num_hidden_layers']} layers, "
                 f"hidden {s_spec['hidden_size']}, float32 masters / bfloat16 compute, remat {args.remat}",
      "batch": f"{batch} x {seq_len} = {tokens} tokens, kd impl {args.impl}",
      "compile_s": round(compile_s, 1),
      "step_s": round(step_s, 4),
      "tokens_per_s": round(tokens / step_s, 1),
      "mfu_step": round(step_flops / step_s / peak, 4),
      "student_step_s": round(student_s, 4),
      "mfu_student": round(student_flops / student_s / peak, 4),
      "xla_tflop_step": float(f"{bench.flops['kd'] / 1e12:.4g}"),
      "model_tflop_step": float(f"{step_flops / 1e12:.4g}"),
      "peak_tflops": round(peak / 1e12, 3),
      "peak_from": peak_from,
      "generate_greedy_tokens_per_s": round(gen["greedy"], 1),
      "generate_sampled_tokens_per_s": round(gen["sampled"], 1),
  }
  for key, value in result.items():
    print(f"{key}: {value}")
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
