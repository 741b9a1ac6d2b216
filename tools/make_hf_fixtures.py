"""Writes the golden Hugging Face fixtures of tests/test_pretrained_models.py (tests/fixtures/hf/<family>/).

Needs a Python 3.11 virtual environment with torch and transformers (kdlab's own venv is used, in a
subprocess, only for the export check)::

  python3.11 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors
  /tmp/hfvenv/bin/python tools/make_hf_fixtures.py [--kdlab-python .venv/bin/python]

For each family (llama, qwen2, qwen3, gemma3) it builds a tiny random transformers model whose every
parameter (norm scales and biases included) is perturbed with noise, saves it with transformers'
``save_pretrained`` and writes:

* ``reference.npz``: ``tokens`` ``[2, 24]`` int32 and ``logits`` ``[2, 24, V]`` float32, from
  transformers' eager attention in float32;
* ``reference.json``: the torch/transformers/safetensors versions, how the weights are stored and
  the export check's result;
* for ``llama`` and ``qwen2``, the tokenizer files of tests/fixtures/hf_tokenizer/chatml (vocab 400;
  ``qwen2``'s embedding is padded to 416 rows), so those directories are complete checkpoints.

``qwen2`` is stored in bfloat16 and split into shards (``model.safetensors.index.json``); its
reference logits are computed in float32 from the stored (bfloat16) weights. The others are float32
in one ``model.safetensors``.

Export check: kdlab loads each fixture (``kdlab.models.from_pretrained``) and writes it back with
``kdlab.models.save_pretrained`` into a temporary folder; transformers must load that folder with no
missing or unexpected tensors and give the reference logits (max abs difference < 1e-4). The tool
fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import safetensors
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "hf"
TOKENIZER = ROOT / "tests" / "fixtures" / "hf_tokenizer" / "chatml"  # tools/make_tokenizer_fixtures.py
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENS_SHAPE = (2, 24)
TOLERANCE = 1e-4

_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5)

FAMILIES = {
    # Llama 3.1 frequency scaling with a short original context, so that the head's four
    # wavelengths (6, 63, 628, 6283) fall in the kept, interpolated and scaled bands.
    # The ChatML test tokenizer's 400 ids: the teacher of tests/test_hf_distill.py.
    "llama": dict(cls="LlamaConfig", stored="float32", shard=None, tokenizer=True, config=dict(
        _SMALL, vocab_size=400, num_hidden_layers=2, head_dim=8, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    # q/k/v biases; the second layer with a 6-token sliding window. The same tokenizer as llama with
    # the embedding padded to 416 rows (as Qwen2.5's 152,064 rows hold a 151,665-token vocabulary).
    "qwen2": dict(cls="Qwen2Config", stored="bfloat16", shard="40KB", tokenizer=True, config=dict(
        _SMALL, vocab_size=416, num_hidden_layers=2, tie_word_embeddings=False, use_sliding_window=True, sliding_window=6,
        max_window_layers=1, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Per-head q/k norms, head_dim != hidden / heads, tied embeddings, biases everywhere in attention.
    "qwen3": dict(cls="Qwen3Config", stored="float32", shard=None, config=dict(
        _SMALL, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Local (window 5, own base frequency) and global (linear scaling) layers, query scale from
    # query_pre_attn_scalar, final soft-capping; attn_logit_softcapping set, which transformers'
    # Gemma 3 does not apply (so kdlab must not either).
    "gemma3": dict(cls="Gemma3TextConfig", stored="float32", shard=None, config=dict(
        _SMALL, num_hidden_layers=3, head_dim=8, query_pre_attn_scalar=12, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=100000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
        final_logit_softcapping=2.0, attn_logit_softcapping=3.0, tie_word_embeddings=True)),
}

_EXPORT = """
import sys
from kdlab.models import from_pretrained, save_pretrained
save_pretrained(from_pretrained(sys.argv[1]), sys.argv[2])
"""


def build(family: str, seed: int) -> torch.nn.Module:
  """The tiny random model of ``family`` with every parameter perturbed."""
  spec = FAMILIES[family]
  config = getattr(transformers, spec["cls"])(**spec["config"])
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.1)  # norms too: a (1 + w) vs w mistake then shows
  return model


def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def export_check(family: str, directory: pathlib.Path, reference: np.ndarray, tokens: np.ndarray,
                 kdlab_python: str) -> dict:
  """kdlab reloads ``directory`` and exports it; transformers reads the export back."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "export"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([kdlab_python, "-c", _EXPORT, str(directory), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"{family}: kdlab export failed:\n{proc.stderr[-3000:]}")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    diff = float(np.abs(logits_of(model.eval(), tokens) - reference).max())
    result = {"max_abs_diff": diff, "missing_keys": sorted(info["missing_keys"]),
              "unexpected_keys": sorted(info["unexpected_keys"]), "files": sorted(p.name for p in out.iterdir())}
  if diff > TOLERANCE or result["missing_keys"] or result["unexpected_keys"]:
    raise SystemExit(f"{family}: transformers does not reproduce kdlab's export: {result}")
  return result


def write(family: str, seed: int, kdlab_python: str) -> None:
  spec = FAMILIES[family]
  model = build(family, seed)
  directory = OUT / family
  directory.mkdir(parents=True, exist_ok=True)
  for old in directory.iterdir():
    old.unlink()
  if spec["stored"] == "bfloat16":
    model = model.to(torch.bfloat16)
  kwargs = {} if spec["shard"] is None else {"max_shard_size": spec["shard"]}
  model.save_pretrained(directory, **kwargs)
  if spec.get("tokenizer"):
    for name in TOKENIZER_FILES:
      shutil.copyfile(TOKENIZER / name, directory / name)
  # The reference reads the saved files back in float32 (a model cast to bfloat16 and back would
  # keep bfloat16-rounded RoPE frequencies, which the checkpoint does not hold).
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, model.config.vocab_size, TOKENS_SHAPE).astype(np.int32)
  logits = logits_of(model, tokens)
  np.savez(directory / "reference.npz", tokens=tokens, logits=logits)
  check = export_check(family, directory, logits, tokens, kdlab_python)
  meta = {"family": family, "model_type": model.config.model_type, "stored_dtype": spec["stored"],
          "sharded": spec["shard"] is not None, "seed": seed, "tokens_shape": list(TOKENS_SHAPE),
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "safetensors": safetensors.__version__},
          "export_check": check}
  (directory / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(f"{family}: {sorted(p.name for p in directory.iterdir())}; export check {check['max_abs_diff']:.2e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kdlab-python", default=str(ROOT / ".venv" / "bin" / "python"),
                      help="a Python with kdlab's dependencies (jax, flax, safetensors)")
  parser.add_argument("--only", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
  args = parser.parse_args()
  for seed, family in enumerate(FAMILIES):
    if family in args.only:
      write(family, seed, args.kdlab_python)


if __name__ == "__main__":
  main()
