"""The TRL (PyTorch, CPU) worker of benchmarks/llm_kd_step.py: GKDTrainer's loss and step on SETUP.

  /work/trlvenv/bin/python benchmarks/llm_kd_step_trl.py --setup SETUP --attn eager|sdpa --serve

Runs in the benchmark's own venv (benchmarks/peers/trl-requirements.txt), never in kdlab's. The
worker protocol (requests, replies, SETUP) is the one of benchmarks/llm_kd_step.py and
benchmarks/workers.py.

How the step is built. Teacher and student are ``transformers.LlamaForCausalLM.from_pretrained``
(float32, ``attn_implementation`` eager or sdpa); the teacher is put in eval mode. A
``trl.experimental.gkd.GKDTrainer`` is constructed the way a TRL user does: ``GKDConfig(lmbda=0,
beta=0, temperature=1, seq_kd=False)`` (off-policy, forward KL) with the learning rate, betas, eps
and weight decay of ``hparams.json``, ``use_cpu=True``, ``report_to=[]``, and ``bf16=False``,
``activation_checkpointing=False`` (TRL's configs default to bf16 autocast and gradient
checkpointing; the protocol is float32 without recomputation). The constructor needs a
``datasets.Dataset`` and a tokenizer: the dataset holds SETUP's batch rows, the tokenizer is a
word-level one whose token ``i`` is id ``i`` (neither is used by the step). One timed kd step is

  kl, out = trainer.compute_loss(student, inputs, return_outputs=True)   # GKDTrainer's own code
  ce = student.loss_function(out.logits, labels, vocab_size)              # transformers' causal-LM CE
  loss = alpha_ce * ce + (1 - alpha_ce) * kl
  loss.backward(); optimizer.step(); optimizer.zero_grad()

with the optimizer of ``trainer.create_optimizer()`` (transformers' default for torch >= 2.8,
``adamw_torch_fused``: ``torch.optim.AdamW(fused=True)``), no clipping and no schedule (the
trainer's training loop, which would add both, is not run). ``compute_loss`` runs the student's
forward, then the teacher's under ``no_grad`` (re-set to eval each call), shifts logits and labels
by one and calls ``GKDTrainer.generalized_jsd_loss``. With ``beta=0`` that is
``F.kl_div(log p_s, log p_t, log_target=True)``, i.e. ``sum_v p_t (log p_t - log p_s)`` =
KL(p_teacher || p_student) at each position, kept where the shifted label is not -100; its
"batchmean" reduction divides the sum by the number of kept positions: the mean over the batch's
completion tokens, the protocol's reduction. (Under ``trainer.train()`` the trainer passes
``num_items_in_batch`` = the count of ``labels[:, 1:] != -100``, which is the same number.)
``compute_loss`` does not return the CE: it is computed on the same student logits with
transformers' ``ForCausalLMLoss``, also a mean over the completion tokens. ``compute_loss`` does not
pass its ``temperature`` to the loss (T is always 1 there), so this worker refuses another T.

Ops: ``info``; ``loss_at_init`` (``{"kd", "ce", "kl"}`` on the initial weights, under ``no_grad``);
``kd``, ``student`` (CE only, ``student(..., labels=labels).loss``, the same optimizer) and
``teacher`` (the teacher's forward under ``no_grad``) ->
``{"times", "loss" (the first timed step's), "maxrss_mib"}``. ``kd`` also returns the split of each timed step:
``teacher_s`` (the teacher's forward, from hooks on it), ``loss_s`` (``generalized_jsd_loss`` and
the CE, forward only) and ``student_s`` (the rest: the student's forward, the whole backward,
the update). torch on CPU is synchronous, so the split costs two clock reads per part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workers import maxrss_mib, peer_worker  # noqa: E402


def word_tokenizer(vocab_size: int) -> Any:
  """A fast tokenizer whose token ``"<i>"`` has id ``i``: GKDTrainer's constructor requires one (it
  reads ``pad_token_id`` for on-policy generation, unused at ``lmbda=0``)."""
  from tokenizers import Tokenizer
  from tokenizers.models import WordLevel
  from tokenizers.pre_tokenizers import WhitespaceSplit
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
  tok.pre_tokenizer = WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", pad_token="<0>", eos_token="<2>")


class Clock:
  """Seconds spent inside the calls it wraps (summed until ``take()``)."""

  def __init__(self):
    self.total, self.start = 0.0, 0.0

  def begin(self, *_: Any) -> None:
    self.start = time.perf_counter()

  def end(self, *_: Any) -> None:
    self.total += time.perf_counter() - self.start

  def wrap(self, fn: Callable) -> Callable:
    def timed_call(*args: Any, **kwargs: Any) -> Any:
      self.begin()
      try:
        return fn(*args, **kwargs)
      finally:
        self.end()
    return timed_call

  def take(self) -> float:
    out, self.total = self.total, 0.0
    return out


class TrlBench:
  """Teacher, student, GKDTrainer and its optimizer on SETUP's batch; ``run(op)`` does one step."""

  def __init__(self, setup: pathlib.Path, attn: str):
    import datasets
    import transformers
    from transformers import LlamaForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    hp = json.loads((setup / "hparams.json").read_text())
    if hp["temperature"] != 1.0:
      raise ValueError(f"hparams.temperature: {hp['temperature']}; GKDTrainer.compute_loss always uses T = 1")
    torch.set_num_threads(int(hp["threads"]))
    self.alpha = float(hp["alpha_ce"])
    data = np.load(setup / "batch.npz")
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "labels": torch.from_numpy(data["labels"].astype(np.int64))}

    def load(name: str) -> LlamaForCausalLM:
      return LlamaForCausalLM.from_pretrained(setup / name, dtype=torch.float32, attn_implementation=attn)

    self.student, self.teacher = load("student"), load("teacher")
    self.teacher.eval()
    self.student.train()
    self.vocab_size = self.student.config.vocab_size
    rows = datasets.Dataset.from_dict({k: v.tolist() for k, v in self.inputs.items()})
    self.workdir = tempfile.TemporaryDirectory(prefix="trl_gkd_")
    args = GKDConfig(
        output_dir=self.workdir.name, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        learning_rate=hp["lr"], weight_decay=hp["weight_decay"], adam_beta1=hp["betas"][0],
        adam_beta2=hp["betas"][1], adam_epsilon=hp["eps"], lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=ids.shape[0], use_cpu=True, report_to=[], bf16=False, fp16=False,
        activation_checkpointing=False, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    self.trainer = GKDTrainer(model=self.student, teacher_model=self.teacher, args=args, train_dataset=rows,
                              data_collator=transformers.default_data_collator,
                              processing_class=word_tokenizer(self.vocab_size))
    if self.trainer.model is not self.student or self.trainer.teacher_model is not self.teacher:
      raise RuntimeError("GKDTrainer wrapped the models; the timing hooks would miss them")
    self.optimizer = self.trainer.create_optimizer()
    self.teacher_clock, self.loss_clock = Clock(), Clock()
    self.teacher.register_forward_pre_hook(self.teacher_clock.begin)
    self.teacher.register_forward_hook(self.teacher_clock.end)
    # An instance attribute shadows the static method: compute_loss calls self.generalized_jsd_loss(...).
    self.trainer.generalized_jsd_loss = self.loss_clock.wrap(GKDTrainer.generalized_jsd_loss)
    self.trained = False

  def kd_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` of the kd step on the current weights (scalars, with graph unless no_grad)."""
    kl, out = self.trainer.compute_loss(self.student, self.inputs, return_outputs=True)
    self.loss_clock.begin()
    ce = self.student.loss_function(out.logits, self.inputs["labels"], vocab_size=self.vocab_size)
    loss = self.alpha * ce + (1.0 - self.alpha) * kl
    self.loss_clock.end()
    return loss, ce, kl

  def loss_at_init(self) -> dict[str, float]:
    if self.trained:
      raise RuntimeError("loss_at_init: the weights have been trained; ask it before any kd/student op")
    with torch.no_grad():
      loss, ce, kl = self.kd_loss()
    self.teacher_clock.take(), self.loss_clock.take()
    return {"kd": loss.item(), "ce": ce.item(), "kl": kl.item()}

  def update(self, loss: torch.Tensor) -> float:
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.trained = True
    return loss.item()

  def run(self, op: str) -> float | None:
    """One step of ``op``; its loss (None for the teacher)."""
    if op == "kd":
      return self.update(self.kd_loss()[0])
    if op == "student":
      return self.update(self.student(**self.inputs).loss)
    if op == "teacher":
      with torch.no_grad():
        self.teacher(input_ids=self.inputs["input_ids"], attention_mask=self.inputs["attention_mask"])
      return None
    raise ValueError(f"op: {op!r} is not one of kd, student, teacher, info, loss_at_init")

  def timed(self, op: str, n: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
      self.run(op)
    times, losses, split = [], [], {"teacher_s": [], "loss_s": [], "student_s": []}
    self.teacher_clock.take(), self.loss_clock.take()
    for _ in range(n):
      t0 = time.perf_counter()
      losses.append(self.run(op))
      times.append(time.perf_counter() - t0)
      teacher_s, loss_s = self.teacher_clock.take(), self.loss_clock.take()
      split["teacher_s"].append(teacher_s)
      split["loss_s"].append(loss_s)
      split["student_s"].append(times[-1] - teacher_s - loss_s)
    reply = {"times": times, "loss": losses[0] if losses else None, "maxrss_mib": maxrss_mib()}
    return {**reply, **split} if op == "kd" else reply


def info(attn: str, bench: TrlBench) -> dict[str, Any]:
  import transformers
  import trl
  opt = bench.optimizer
  flags = {k: opt.defaults.get(k) for k in ("fused", "foreach", "lr", "betas", "eps")}
  flags["weight_decay"] = sorted({g["weight_decay"] for g in opt.param_groups})
  return {"framework": f"TRL ({attn})", "trl": trl.__version__, "transformers": transformers.__version__,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
          "attn": attn, "optimizer": f"{type(opt).__module__}.{type(opt).__name__}", "optimizer_flags": flags,
          "trainer": type(bench.trainer).__name__,
          "activation_checkpointing": bool(bench.student.is_activation_checkpointing)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup", required=True, help="the SETUP folder written by benchmarks/llm_kd_step.py")
  parser.add_argument("--attn", choices=("eager", "sdpa"), default="sdpa")
  parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (the worker protocol)")
  args = parser.parse_args()
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the replies
    bench = TrlBench(pathlib.Path(args.setup), args.attn)

  peer_worker(bench, lambda: info(args.attn, bench), args.serve)

if __name__ == "__main__":
  main()
