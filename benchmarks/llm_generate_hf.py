"""The transformers-generate worker of benchmarks/llm_kd_step.py (``--generate``): ``model.generate``
on SETUP's prompts, timed per call.

  /work/trlvenv/bin/python benchmarks/llm_generate_hf.py --setup SETUP --model student|teacher --serve

Runs in the TRL venv (benchmarks/peers/trl-requirements.txt). The model is
``LlamaForCausalLM.from_pretrained`` (float32, ``--attn``, transformers' default sdpa unless told),
in eval mode. One call generates for all of ``batch.npz``'s ``prompts`` ``[16, P]`` (no padding: all
prompts have length P, so the attention mask is all ones) with the KV cache (``use_cache=True``):
``max_new_tokens = min_new_tokens = new_tokens`` so every call makes exactly ``new_tokens`` per row
(``min_new_tokens`` masks the config's EOS id until then; the worker checks the output length),
greedy (``do_sample=False``) or sampled at temperature 1 with no top-k / top-p
(``top_k=0``, ``top_p=1``). Sampling is seeded (``torch.manual_seed(0)``) before every call.

Ops: ``info``; ``{"op": "generate", "greedy": bool, "n": N, "warmup": W}`` ->
``{"times": [s per call], "tokens": new tokens per call (rows x new_tokens), "maxrss_mib"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import sys
from typing import Any

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workers import maxrss_mib, serve, timed  # noqa: E402


class HfGenerate:
  """A model from SETUP and its prompts; ``call(greedy)`` generates once."""

  def __init__(self, setup: pathlib.Path, model: str, attn: str):
    from transformers import LlamaForCausalLM

    hp = json.loads((setup / "hparams.json").read_text())
    torch.set_num_threads(int(hp["threads"]))
    data = np.load(setup / "batch.npz")
    self.prompts = torch.from_numpy(data["prompts"].astype(np.int64))
    self.new_tokens = int(data["new_tokens"])
    self.model = LlamaForCausalLM.from_pretrained(setup / model, dtype=torch.float32, attn_implementation=attn)
    self.model.eval()
    eos = self.model.config.eos_token_id
    self.eos = eos[0] if isinstance(eos, list) else eos
    self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else (self.eos or 0)

  def config(self, greedy: bool) -> Any:
    from transformers import GenerationConfig
    sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=not greedy,
                            use_cache=True, eos_token_id=self.eos, pad_token_id=self.pad, **sampling)

  def call(self, greedy: bool) -> None:
    config = self.config(greedy)
    torch.manual_seed(0)
    with torch.no_grad():
      out = self.model.generate(input_ids=self.prompts, attention_mask=torch.ones_like(self.prompts),
                                generation_config=config)
    want = (self.prompts.shape[0], self.prompts.shape[1] + self.new_tokens)
    if tuple(out.shape) != want:
      raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {want}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup", required=True, help="the SETUP folder written by benchmarks/llm_kd_step.py")
  parser.add_argument("--model", choices=("student", "teacher"), default="student")
  parser.add_argument("--attn", choices=("eager", "sdpa"), default="sdpa")
  parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (the worker protocol)")
  args = parser.parse_args()
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the replies
    gen = HfGenerate(pathlib.Path(args.setup), args.model, args.attn)

  def answer(req: dict) -> dict:
    import transformers
    with contextlib.redirect_stdout(sys.stderr):
      op = req["op"]
      if op == "info":
        return {"framework": "transformers generate", "transformers": transformers.__version__,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "model": args.model, "attn": args.attn}
      if op != "generate":
        raise ValueError(f"op: {op!r} is not one of info, generate")
      greedy = bool(req["greedy"])
      times = timed(lambda: gen.call(greedy), int(req.get("n", 1)), int(req.get("warmup", 0)))
      return {"times": times, "tokens": int(gen.prompts.shape[0]) * gen.new_tokens, "maxrss_mib": maxrss_mib()}

  if args.serve:
    serve(answer)
  else:
    print(json.dumps(answer({"op": "generate", "greedy": True, "n": 1, "warmup": 1})))


if __name__ == "__main__":
  main()
