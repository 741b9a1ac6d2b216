"""The Tunix (JAX) worker of benchmarks/llm_kd_step.py: LogitStrategy and DistillationTrainer's step on SETUP.

  /work/tunixvenv/bin/python benchmarks/llm_kd_step_tunix.py --setup SETUP --serve [--mask labels|slice]

Runs in the benchmark's own venv (benchmarks/peers/tunix-requirements.txt), never in kdlab's. The
worker protocol (requests, replies, SETUP) is the one of benchmarks/llm_kd_step.py and
benchmarks/workers.py.

How the models are built. Teacher and student are Tunix's own Llama
(``tunix.models.llama3.model.Llama3``) with a ``ModelConfig`` read from each SETUP ``config.json``
(``weight_tying`` = ``tie_word_embeddings``), their weights read from the directory's
safetensors by Tunix's loader (``tunix.models.llama3.params.create_model_from_safe_tensors``: it
transposes and reshapes the Hugging Face tensors to Tunix's layout), float32. One patch: Tunix
0.1.7's attention calls ``apply_rope`` without ``ModelConfig.rope_theta``, so RoPE always uses
apply_rope's default base, 1e6. When the SETUP's base differs (the driver writes 500000), this
worker gives ``tunix.models.llama3.model.apply_rope`` the config's base (teacher and student must
share it).
Without the patch, the models would not compute the SETUP's function. ``info`` says whether the
patch is on.

How the step is built: the way Tunix's logit-distillation example does it. A
``tunix.distillation.strategies.LogitStrategy(temperature=T, alpha=1 - alpha_ce)`` (Tunix's
``alpha`` weights the distillation term) with these user functions:
  forward(model, ...)  ``model(input_tokens, positions, None, attention_mask)`` logits without the
                       last position: ``[B, L - 1, V]`` (position t predicts token t + 1);
  labels(...)          ``one_hot(input_tokens[:, 1:]) * input_mask[:, 1:]``, with
                       ``input_mask = labels != -100`` (the completion tokens);
and positions and the causal mask from ``tunix.sft.utils`` (no padding). A
``tunix.distillation.distillation_trainer.DistillationTrainer`` is built with that strategy and
``optax.adamw(lr, b1, b2, eps, weight_decay)`` from ``hparams.json`` (no schedule, no clipping,
Tunix adds neither), and driven one step at a time without a data loader, by the same calls its
``train()`` makes for each batch:
  example = trainer._prepare_inputs(TrainingInput(...))  # the teacher's forward: the strategy's
                                                          # own nnx.jit, then stop_gradient
  loss, aux, grad_norm = train_step(example)              # trainer.jit_train_and_eval_step(
                                                          # cache_nnx_graph=True): one nnx.jit of
                                                          # the student's forward, the strategy's
                                                          # loss, nnx.value_and_grad, optimizer.update
So the teacher's forward and the student's step are two compiled calls, as in Tunix's trainer; the
teacher's logits ``[B, L - 1, V]`` pass between them. One addition: before jitting, the optimizer
state is committed to the device (``commit_optimizer_state``), the single-device form of what the
trainer does under a mesh; without it the step compiles again on its second call. Timing blocks
on the loss and the student's parameters (``jax.block_until_ready``); the kd reply also splits each
step into ``teacher_s`` (the teacher's call, blocked on its logits) and ``student_s`` (the rest).

The loss LogitStrategy computes (``logit.py``): ``alpha * mean(T^2 KL(p_t || p_s)) + (1 - alpha) *
mean(CE)``, where KL is ``optax.kl_divergence(log_softmax(s / T), softmax(t / T))`` and CE
``optax.softmax_cross_entropy(s, labels)`` per position, and both means run over all B x (L - 1)
positions. The strategy takes no mask: the documented way (the ``labels`` mode, the default) zeroes
the CE of non-completion positions through the one-hot labels, so its CE is the completion tokens'
CE summed and divided by all B x (L - 1) positions, and its KL is averaged over every position,
the prompt's included. The protocol's loss (both terms averaged over the completion tokens) is
therefore not Tunix's: ``loss_at_init`` returns Tunix's ``kd``/``ce``/``kl`` (``ce`` =
``distill/hard_loss``, ``kl`` = ``distill/soft_loss``) and the protocol's ``kd_protocol``/
``ce_protocol``/``kl_protocol`` computed on the same logits. ``--mask slice`` makes Tunix compute the
protocol's loss instead: the forward and labels functions keep only the completion positions (every
row of the batch must have the same prompt length), so both of the strategy's means are over the
completion tokens. The model's logits are the same in both modes; only the loss's positions differ.

Ops: ``info``; ``loss_at_init`` (Tunix's ``trainer.get_train_loss`` on the initial weights, no
update); ``kd``; ``student`` (a ``tunix.sft.peft_trainer.PeftTrainer`` on the same student model,
its default loss: CE averaged over the completion tokens, the same optimizer settings, its own
optimizer state; built on first use); ``teacher`` (the strategy's jitted teacher forward) ->
``{"times", "loss", "maxrss_mib"}``. The first step of each op compiles; the driver's warm-up takes
it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workers import maxrss_mib, peer_worker  # noqa: E402


def rope_theta(cfg: dict[str, Any]) -> float:
  """The RoPE base of a Hugging Face llama ``config.json`` (either spelling); refuses scaled RoPE."""
  rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"rope type {kind!r}: Tunix's llama3 model implements only the default RoPE")
  return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_config(directory: pathlib.Path) -> tuple[Any, float]:
  """Tunix's ``ModelConfig`` for a Hugging Face llama directory, and its RoPE base."""
  from tunix.models.llama3 import model as llama

  cfg = json.loads((directory / "config.json").read_text())
  if cfg.get("model_type") != "llama":
    raise ValueError(f"{directory}: model_type {cfg.get('model_type')!r}, expected 'llama'")
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if cfg.get(key, want) != want:
      raise ValueError(f"{directory}: {key} = {cfg[key]!r}; Tunix's llama3 model has {want!r}")
  heads = int(cfg["num_attention_heads"])
  theta = rope_theta(cfg)
  config = llama.ModelConfig(
      num_layers=int(cfg["num_hidden_layers"]), vocab_size=int(cfg["vocab_size"]),
      embed_dim=int(cfg["hidden_size"]), hidden_dim=int(cfg["intermediate_size"]), num_heads=heads,
      head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads), rope_theta=int(theta),
      norm_eps=float(cfg["rms_norm_eps"]), weight_tying=bool(cfg.get("tie_word_embeddings", False)))
  return config, theta


def use_rope_theta(theta: float) -> bool:
  """Makes Tunix's llama3 attention use RoPE base ``theta``; True when that needed a patch.

  The attention calls ``apply_rope`` without a base, so it gets the function's default (1e6 in
  0.1.7) whatever ``ModelConfig.rope_theta`` says; the patch changes that default."""
  import inspect

  from tunix.models.llama3 import model as llama

  original = llama.apply_rope
  if float(inspect.signature(original).parameters["rope_theta"].default) == theta:
    return False

  def apply_rope(inputs, positions, head_dim, rope_theta=theta):
    return original(inputs, positions, head_dim=head_dim, rope_theta=rope_theta)

  llama.apply_rope = apply_rope
  return True


def commit_optimizer_state(optimizer: Any) -> None:
  """Commits an ``nnx.Optimizer``'s state to the first device.

  Its step counters start as uncommitted arrays and come back from the jitted step committed; jit
  keys on that, so Tunix's step compiles twice (steps 1 and 2). Under a mesh Tunix's trainer puts
  the optimizer state on its sharding before jitting to avoid this (``_shard_optimizer``); without
  one it skips that, so this does the single-device equivalent."""
  import jax
  from flax import nnx
  nnx.update(optimizer, jax.device_put(nnx.state(optimizer), jax.devices()[0]))


class TunixBench:
  """Teacher, student, LogitStrategy, DistillationTrainer and its jitted step on SETUP's batch."""

  def __init__(self, setup: pathlib.Path, mask: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.distillation import distillation_trainer, strategies
    from tunix.models.llama3 import params
    from tunix.sft import utils as sft_utils

    self.jax, self.nnx = jax, nnx
    hp = json.loads((setup / "hparams.json").read_text())
    self.hp, self.mask = hp, mask
    data = np.load(setup / "batch.npz")
    ids, labels = data["input_ids"].astype(np.int32), data["labels"]
    completion = labels != -100  # HF convention: labels[t] is the target of position t - 1
    (t_cfg, t_theta), (s_cfg, s_theta) = model_config(setup / "teacher"), model_config(setup / "student")
    if t_theta != s_theta:
      raise ValueError(f"RoPE base: teacher {t_theta}, student {s_theta}; the Tunix patch needs one base")
    if t_cfg.vocab_size != s_cfg.vocab_size:
      raise ValueError(f"vocab: teacher {t_cfg.vocab_size}, student {s_cfg.vocab_size}; they must match")
    self.rope_patched = use_rope_theta(t_theta)
    self.theta = t_theta
    self.teacher = params.create_model_from_safe_tensors(str(setup / "teacher"), t_cfg, dtype=jnp.float32)
    self.student = params.create_model_from_safe_tensors(str(setup / "student"), s_cfg, dtype=jnp.float32)
    vocab = s_cfg.vocab_size

    starts = completion.argmax(axis=1)
    if mask == "slice" and (not completion.any(axis=1).all() or (starts != starts[0]).any()
                            or not completion[:, starts[0]:].all()):
      raise ValueError("--mask slice: every row must have the same prompt length and then only completion tokens")
    # Positions that predict a completion token, in the logits [B, L - 1] (labels mode keeps all).
    first = int(starts[0]) - 1 if mask == "slice" else 0

    def forward(model, input_tokens, input_mask, positions, attention_mask):
      del input_mask
      logits, _ = model(input_tokens, positions, None, attention_mask)
      return logits[:, first:-1]

    def labels_fn(input_tokens, input_mask, positions, attention_mask):
      del positions, attention_mask
      one_hot = jax.nn.one_hot(input_tokens[:, first + 1:], vocab)
      return one_hot * input_mask[:, first + 1:].astype(one_hot.dtype)[..., None]

    def model_inputs(x):
      not_pad = jnp.ones(x.input_tokens.shape, jnp.bool_)
      return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
              "positions": sft_utils.build_positions_from_mask(not_pad),
              "attention_mask": sft_utils.make_causal_attn_mask(not_pad)}

    self.model_inputs = model_inputs
    self.example = distillation_trainer.TrainingInput(input_tokens=jnp.asarray(ids),
                                                      input_mask=jnp.asarray(completion, jnp.int32))
    self.alpha = 1.0 - float(hp["alpha_ce"])  # Tunix's alpha weights the KL term
    self.strategy = strategies.LogitStrategy(student_forward_fn=forward, teacher_forward_fn=forward,
                                             labels_fn=labels_fn, temperature=float(hp["temperature"]),
                                             alpha=self.alpha)
    self.trainer = distillation_trainer.DistillationTrainer(
        student_model=self.student, teacher_model=self.teacher, strategy=self.strategy,
        optimizer=self.adamw(), training_config=distillation_trainer.TrainingConfig(eval_every_n_steps=1 << 30),
    ).with_gen_model_input_fn(model_inputs)
    commit_optimizer_state(self.trainer.optimizer)
    self.train_step, _ = self.trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    self.student_step = None  # the CE-only PeftTrainer's step, built on first use
    self.trained = False

    target_mask = jnp.asarray(completion[:, 1:], jnp.float32)
    target_ids = jnp.asarray(ids[:, 1:])
    alpha_ce, temp = float(hp["alpha_ce"]), float(hp["temperature"])

    def all_logits(model, inputs):
      logits, _ = model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
      return logits[:, :-1].astype(jnp.float32)

    @nnx.jit
    def protocol_loss(student, teacher, inputs):
      # The protocol's loss, our code: CE and T^2 KL(p_t || p_s) at temperature T, each averaged
      # over the positions that predict a completion token.
      s, t = all_logits(student, inputs), all_logits(teacher, inputs)
      log_ps, log_pt = jax.nn.log_softmax(s / temp), jax.nn.log_softmax(t / temp)
      kl = (jnp.exp(log_pt) * (log_pt - log_ps)).sum(-1) * temp ** 2
      ce = -jnp.take_along_axis(jax.nn.log_softmax(s), target_ids[..., None], axis=-1)[..., 0]
      n = target_mask.sum()
      ce, kl = (ce * target_mask).sum() / n, (kl * target_mask).sum() / n
      return alpha_ce * ce + (1.0 - alpha_ce) * kl, ce, kl

    self.protocol_loss = protocol_loss

  def adamw(self) -> Any:
    import optax
    hp = self.hp
    return optax.adamw(hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"], weight_decay=hp["weight_decay"])

  def student_params(self) -> list[Any]:
    return self.jax.tree.leaves(self.nnx.state(self.student, self.nnx.Param))

  def logits(self, which: str) -> np.ndarray:
    """A model's full logits ``[B, L, V]`` on the batch (for checking the weights against transformers)."""
    model = self.teacher if which == "teacher" else self.student
    inputs = self.model_inputs(self.example)
    out, _ = self.nnx.jit(lambda m, i: m(i["input_tokens"], i["positions"], None, i["attention_mask"]))(model, inputs)
    return np.asarray(out)

  def loss_at_init(self) -> dict[str, float]:
    if self.trained:
      raise RuntimeError("loss_at_init: the weights have been trained; ask it before any kd/student op")
    inputs = self.model_inputs(self.example)
    teacher_out = self.strategy.get_teacher_outputs(self.teacher, inputs)
    loss, metrics = self.trainer.get_train_loss(self.student, teacher_out, inputs)
    kd, ce, kl = self.protocol_loss(self.student, self.teacher, inputs)
    return {"kd": float(loss), "ce": float(metrics["distill/hard_loss"]), "kl": float(metrics["distill/soft_loss"]),
            "kd_protocol": float(kd), "ce_protocol": float(ce), "kl_protocol": float(kl)}

  def kd(self) -> tuple[float, float, Any]:
    """One step as DistillationTrainer.train runs it; ``(teacher seconds, total seconds, loss)``."""
    from tunix.sft import sharding_utils
    t0 = time.perf_counter()
    example = self.trainer._prepare_inputs(self.example)  # noqa: SLF001 -- train()'s own call
    self.jax.block_until_ready(example.teacher_output)
    t1 = time.perf_counter()
    example = sharding_utils.shard_input(example, self.trainer.config.data_sharding_axis)
    loss, _, _ = self.train_step(example)
    self.jax.block_until_ready((loss, self.student_params()))
    return t1 - t0, time.perf_counter() - t0, loss

  def student_only(self) -> Any:
    """One step of a PeftTrainer on the student with Tunix's default (masked-mean CE) loss."""
    if self.student_step is None:
      from tunix.sft import peft_trainer
      sft = peft_trainer.PeftTrainer(self.student, self.adamw(),
                                     peft_trainer.TrainingConfig(eval_every_n_steps=1 << 30))
      sft = sft.with_gen_model_input_fn(self.model_inputs)
      commit_optimizer_state(sft.optimizer)
      self.student_step, _ = sft.jit_train_and_eval_step(cache_nnx_graph=True)
    loss, _, _ = self.student_step(self.example)
    self.jax.block_until_ready((loss, self.student_params()))
    return loss

  def teacher_forward(self) -> None:
    inputs = self.model_inputs(self.example)
    self.jax.block_until_ready(self.strategy.get_teacher_outputs(self.teacher, inputs))

  def timed(self, op: str, n: int, warmup: int) -> dict[str, Any]:
    if op not in ("kd", "student", "teacher"):
      raise ValueError(f"op: {op!r} is not one of kd, student, teacher, info, loss_at_init")
    times, losses, split = [], [], {"teacher_s": [], "student_s": []}
    for i in range(warmup + n):
      t0 = time.perf_counter()
      if op == "kd":
        teacher_s, total, loss = self.kd()
      elif op == "student":
        loss = self.student_only()
      else:
        self.teacher_forward()
        loss = None
      if op != "teacher":
        self.trained = True
      if i < warmup:
        continue
      if op == "kd":
        times.append(total)
        split["teacher_s"].append(teacher_s)
        split["student_s"].append(total - teacher_s)
      else:
        times.append(time.perf_counter() - t0)
      losses.append(None if loss is None else float(loss))
    reply = {"times": times, "loss": losses[0] if losses else None, "maxrss_mib": maxrss_mib()}
    return {**reply, **split} if op == "kd" else reply


def info(bench: TunixBench) -> dict[str, Any]:
  import jax
  versions = {name: importlib.metadata.version(dist) for name, dist in
              (("tunix", "google-tunix"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
               ("optax", "optax"), ("qwix", "qwix"))}
  return {"framework": "Tunix", **versions, "python": platform.python_version(), "backend": jax.default_backend(),
          "threads": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "model": "tunix.models.llama3.model.Llama3", "strategy": type(bench.strategy).__name__,
          "alpha": bench.alpha, "trainer": type(bench.trainer).__name__, "mask": bench.mask,
          "rope_theta": bench.theta, "rope_theta_patch": bench.rope_patched}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup", required=True, help="the SETUP folder written by benchmarks/llm_kd_step.py")
  parser.add_argument("--mask", choices=("labels", "slice"), default="labels",
                      help="labels: Tunix's documented masking (CE through the one-hot labels, KL over all "
                           "positions); slice: only the completion positions reach the strategy (the protocol's loss)")
  parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (the worker protocol)")
  parser.add_argument("--dump-logits", default=None, help="write the models' logits on the batch to this .npz and exit")
  args = parser.parse_args()
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the replies
    bench = TunixBench(pathlib.Path(args.setup), args.mask)
    if args.dump_logits:
      np.savez(args.dump_logits, teacher=bench.logits("teacher"), student=bench.logits("student"))
      return

  peer_worker(bench, lambda: info(bench), args.serve)

if __name__ == "__main__":
  main()
