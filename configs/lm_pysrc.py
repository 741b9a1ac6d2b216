"""Byte-level GPT language models on ``pysrc`` (the stdlib's own .py files): token-level distillation.

Run (the teacher first; every student is evaluated against it, so it needs the teacher's checkpoint):
  kdlab train --config=configs/lm_pysrc.py:teacher --workdir=runs/lm_pysrc/teacher
  kdlab train --config=configs/lm_pysrc.py:student --workdir=runs/lm_pysrc/student
  kdlab train --config=configs/lm_pysrc.py:kd --workdir=runs/lm_pysrc/kd
  kdlab cache-teacher --config=configs/lm_pysrc.py:kd-cached --out=runs/lm_pysrc/teacher_cache
  kdlab train --config=configs/lm_pysrc.py:kd-cached --workdir=runs/lm_pysrc/kd-cached
(``--config.teachers[0].init=DIR/checkpoints`` or the option ``teacher=DIR/checkpoints`` points at
another teacher; ``cache=DIR`` at another cache.)

Variants (``arg`` is ``VARIANT[,key=value...]``):
  teacher     gpt d_model 192, 4 layers, 4 heads (1.8M parameters), 800 steps; CE on the next byte.
  student     gpt d_model 128, 2 layers, 4 heads (0.43M parameters), 300 steps; CE only (the teacher is
              loaded for the eval metrics only).
  kd          the student, token-level KL(p_teacher || p_student) at T = 1 against the live teacher.
  reverse_kl  the student, KL(p_student || p_teacher) (mode seeking, MiniLLM).
  jsd         the student, generalized JSD (GKD) with beta = 0.1 (option ``beta=B``; beta = 0.5 is measured
              in paper_repro/lm_token_kd/results_600steps_beta05.md).
  kd-cached   the student, ``topk_kd`` against the teacher's top-k outputs read from
              ``config.teacher_cache`` (built by ``kdlab cache-teacher``); no teacher runs in training.
The distilled variants train on ``0.5 * CE + 0.5 * divergence`` (option ``ce=ALPHA``: ``ALPHA * CE +
(1 - ALPHA) * divergence``; ``ce=0`` is the divergence alone), with JSD's weight divided by
``beta * (1 - beta)`` (near the teacher JSD(beta) ~ beta (1 - beta) KL, so this gives it KL's scale).
The divergence switches on after a CE warm-up: weight 0 for the first 100 steps, then rising linearly
to its value over the next 100 (option ``warmup=N``; ``warmup=0``, the default with ``ce=0``: on from
the first step). From a
random init the mode-seeking divergences slow the student's early progress (alone, reverse_kl stalls
on a few frequent bytes: validation loss ~3.3 vs ~2.5, paper_repro/lm_token_kd/results_pure.md; mixed
with CE, one JSD seed in three lagged ~150 steps behind the CE student to the end).
Options: ``teacher=PATH``, ``cache=PATH``, ``k=N`` (cache top-k, default 32), ``impl=plain|chunked|fused``
(how kd / reverse_kl / jsd are computed), ``ce=ALPHA``, ``beta=B`` (jsd), ``warmup=N``, ``steps=N``,
``quick`` (a tiny model and a few steps, for tests; no warm-up).

Data: 128-byte sequences packed from the first 1 MiB of the train split (8,193 sequences, 512
steps of 16 per epoch) and validated on the first 64 KiB of the validation split; every run
reports ``val_loss`` (nats per byte), ``val_ppl``, ``kl_teacher`` (per-token KL(teacher ||
student)) and ``agreement_top1``. Sizes and steps were picked by measurement on the 2-core CPU
machine: the teacher reaches a validation loss about 0.4 nats below the CE student's, and
the whole comparison (paper_repro/lm_token_kd) fits in well under 45 minutes when the machine is quiet.
"""

from __future__ import annotations

import ml_collections

from common import parse_arg

VARIANTS = ("teacher", "student", "kd", "reverse_kl", "jsd", "kd-cached")
OPTIONS = ("teacher", "cache", "k", "impl", "ce", "beta", "warmup", "steps", "quick")
TEACHER = "runs/lm_pysrc/teacher/checkpoints"
CACHE = "runs/lm_pysrc/teacher_cache"


def _gpt(d_model: int, num_layers: int, num_heads: int, max_len: int) -> dict:
  return dict(name="gpt", vocab_size=256, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
              max_len=max_len, mlp_ratio=4, tie_embeddings=True, dropout=0.0, norm="rms")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, VARIANTS, default="kd", options=OPTIONS)
  quick = "quick" in options
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", -1)]
  c.sharding_rules = []
  seq_len = 32 if quick else 128
  c.data = ml_collections.ConfigDict(dict(
      source="pysrc", seq_len=seq_len, max_bytes=(16 << 10) if quick else (1 << 20),
      eval_max_bytes=(4 << 10) if quick else (64 << 10), batch_size=8 if quick else 16,
      eval_batch_size=32 if quick else 128, prefetch_threads=0))  # see configs/common.py
  if quick:
    c.model = _gpt(32, 2 if variant == "teacher" else 1, 2, seq_len)
  elif variant == "teacher":
    c.model = _gpt(192, 4, 4, seq_len)
  else:
    c.model = _gpt(128, 2, 4, seq_len)
  c.model = ml_collections.ConfigDict(c.model)
  teacher = options.get("teacher", TEACHER)
  # Students load the teacher for the eval metrics (KL to the teacher, agreement) even where no term uses it.
  c.teachers = [] if variant == "teacher" else [dict(init=teacher, eval_only=variant in ("student", "kd-cached"))]
  c.teacher_cache = options.get("cache", CACHE) if variant == "kd-cached" else ""
  c.teacher_cache_k = int(options.get("k", 32))
  impl = options.get("impl", "plain")
  alpha = float(options.get("ce", 0.5))  # distilled variants: alpha * CE + (1 - alpha) * divergence
  distill = {
      "kd": dict(loss="kd", temperature=1.0, impl=impl),
      "reverse_kl": dict(loss="reverse_kl", temperature=1.0, impl=impl),
      "jsd": dict(loss="jsd", beta=float(options.get("beta", 0.1)), temperature=1.0, impl=impl),
      "kd-cached": dict(loss="topk_kd", temperature=1.0),
  }
  if variant in distill:
    weight = 1.0 - alpha
    if variant == "jsd":
      # Near the teacher JSD(beta) ~ beta (1 - beta) KL: dividing by that gives the term KL's curvature
      # (at beta = 0.1, 1/0.09); undivided it adds little to CE (paper_repro/lm_token_kd/README.md).
      beta = distill["jsd"]["beta"]
      weight /= beta * (1.0 - beta)
    warmup = int(options.get("warmup", 0 if quick or not alpha else 100))
    if warmup and not alpha:
      raise ValueError(f"warmup={warmup} with ce=0 leaves no loss for the first {warmup} steps; use warmup=0")
    if warmup:
      # CE alone for `warmup` steps, then the divergence's weight rises linearly over as many steps.
      weight = dict(schedule="linear_schedule", init_value=0.0, end_value=weight, transition_steps=warmup,
                    transition_begin=warmup)
    # The divergence first: config.objective[0] is the distillation term in every distilled variant.
    fused = {"impl": "fused"} if impl == "fused" and variant != "kd-cached" else {}  # one pass with the divergence
    c.objective = [dict(distill[variant], weight=weight)] + ([dict(loss="ce", weight=alpha, **fused)] if alpha else [])
  else:
    c.objective = [dict(loss="ce", weight=1.0)]
  c.ema_teacher = None
  c.born_again = None
  c.connector_warmup_steps = 0
  c.vmap_seeds = 0
  steps = int(options.get("steps", 40 if quick else (800 if variant == "teacher" else 300)))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3 if quick else 2e-3, weight_decay=0.01, schedule="cosine",
      warmup_epochs=0.0 if quick else 0.05, boundaries_epochs=[], decay=0.1))
  # Evaluation and checkpoints in epochs: 1 MiB of 128-byte sequences in batches of 16 is 512 steps
  # per epoch (quick: 16 KiB, 32 bytes, batches of 8: 64 steps). Students evaluate half way and at
  # the end, the teacher every quarter; both checkpoint half way and at the end.
  steps_per_epoch = 64 if quick else 512
  c.train = ml_collections.ConfigDict(dict(
      num_epochs=1.0, num_steps=steps, log_every_steps=10 if quick else 50,
      eval_every_epochs=steps / steps_per_epoch / (4 if variant == "teacher" and not quick else 2),
      checkpoint_every_epochs=steps / steps_per_epoch / 2, term_grad_norms=False))
  c.wandb_project = "kdlab"
  return c
