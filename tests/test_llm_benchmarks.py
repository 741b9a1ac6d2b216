"""The LLM benchmarks run: benchmarks/gpu/run.sh at tiny shapes (as on the GPU machine, but CPU),
benchmarks/llm_kd_step.py's kdlab side, and the model-FLOP count MFU is computed from."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from kdlab import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import llm_step  # noqa: E402


def _matmul_count(spec: dict) -> int:
  """Parameters of the abstract model that multiply: all but RMSNorm scales and, when untied, the
  input embedding table (a lookup)."""
  model = nnx.eval_shape(lambda: models.create("llama", **spec))
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    names = "/".join(str(getattr(p, "key", p)) for p in path)
    if leaf.ndim == 1 or (names.startswith("embed/") and not spec["tie_word_embeddings"]):
      continue
    total += math.prod(leaf.shape)
  return total


def test_model_flops_count_the_real_models_matrices():
  for spec in (llm_step.STUDENT_1B, llm_step.TEACHER_8B):
    assert llm_step.matmul_params(spec) == _matmul_count(spec)
  # Llama-3.2-1B: 1.236B parameters in all, 1.2355B of them in matrices (norms are 34k).
  assert abs(llm_step.matmul_params(llm_step.STUDENT_1B) - 1.2355e9) < 1e6
  spec = llm_step.STUDENT_1B
  per_token = llm_step.model_flops(spec, 1, 4096, train=True)
  attn = 12 * 16 * 4096 * 32 * 64
  assert per_token == 6 * llm_step.matmul_params(spec) + attn


def test_gpu_run_script_tiny_on_cpu(tmp_path):
  env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--tiny", "--steps", "1", "--new-tokens", "4",
                         "--gen-batch", "2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1].removeprefix("RESULT "))
  for key in ("step_s", "tokens_per_s", "mfu_step", "student_step_s", "mfu_student", "xla_tflop_step",
              "generate_greedy_tokens_per_s", "generate_sampled_tokens_per_s"):
    assert np.isfinite(result[key]) and result[key] > 0, (key, result)
    assert f"{key}: {result[key]}" in lines
  assert result["batch"].startswith("2 x 64 = 128 tokens")
  assert result["peak_from"] == "measured float32 matmul rate"
  # the model FLOPs MFU uses and XLA's own count of the compiled step agree within 2x at tiny shapes
  assert 0.5 < result["xla_tflop_step"] / result["model_tflop_step"] < 2.0


def test_llm_kd_step_driver_tiny(tmp_path):
  out = tmp_path / "raw.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/llm_kd_step.py"), "--tiny", "--vocab", "300",
                         "--rounds", "1", "--iters", "1", "--warmup", "0", "--setup-dir", str(tmp_path / "setup"),
                         "--json", str(out)], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  raw = json.loads(out.read_text())["results"][0]
  plain, fused = raw["losses"]["kdlab (plain)"], raw["losses"]["kdlab (fused)"]
  assert abs(plain["kd"] - fused["kd"]) < 1e-4 and abs(plain["kl"] - fused["kl"]) < 1e-4
  # 0.5 CE + 0.5 KL of the initial weights
  assert abs(plain["kd"] - (0.5 * plain["ce"] + 0.5 * plain["kl"])) < 1e-5
  assert all(len(raw["times"][name]["kd"]) == 1 for name in raw["times"])
  assert "| kdlab (fused) |" in proc.stdout
  # The report of the recorded run, rebuilt from its JSON, is the printed one (but for the command line).
  again = subprocess.run([sys.executable, str(ROOT / "benchmarks/llm_kd_step.py"), "--report-from", str(out),
                          "--command", "CMD"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert again.returncode == 0, again.stderr[-3000:]
  strip = lambda text: [l for l in text.splitlines() if not l.startswith("Command: ")]  # noqa: E731
  assert strip(again.stdout) == strip(proc.stdout)[-len(strip(again.stdout)):]
  assert "Command: `CMD`" in again.stdout


def test_llm_kd_step_memory_only_tiny(tmp_path):
  """``--memory-only``: a peak RSS per side and XLA's buffer plan of kdlab's kd step (the same
  arguments, state and batch, for both losses)."""
  out = tmp_path / "raw.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/llm_kd_step.py"), "--tiny", "--vocab", "300",
                         "--memory-only", "--setup-dir", str(tmp_path / "setup"), "--json", str(out)],
                        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["memory"]["300"]
  assert set(got["rss_mib"]) == set(got["xla_buffers"]) == {"kdlab (plain)", "kdlab (fused)"}
  assert all(100 < mib < 8192 for mib in got["rss_mib"].values())
  plain, fused = got["xla_buffers"]["kdlab (plain)"], got["xla_buffers"]["kdlab (fused)"]
  assert plain["arguments"] == fused["arguments"] > 0
  assert "| kdlab (fused) |" in proc.stdout
