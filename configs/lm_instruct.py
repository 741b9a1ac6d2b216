"""Distilling a pretrained Hugging Face teacher into a student on chat / instruction data.

``--config=configs/lm_instruct.py:VARIANT,teacher=DIR,data=jsonl:PATH[,student=DIR][,OPTION=VALUE...]``

Teacher and student are local Hugging Face directories (llama, qwen2, qwen3 or gemma3) sharing the
teacher's tokenizer (``config.data.tokenizer = "hf:<teacher>"``); without ``student=DIR`` the student
is a fresh model of the teacher's family with ``layers=N`` blocks (configs/lm_hf.py). The data are
``data=jsonl:PATH`` or ``parquet:PATH`` (kdlab.data.instruct: chats with the tokenizer's chat template,
prompt/completion pairs; the loss on the assistant's tokens, examples packed into rows).

Variants:
  sft       CE on the data's replies (the teacher is evaluated against, not distilled from).
  kd        forward KL(teacher || student) on the data's replies (token-level KD; ``ce=ALPHA`` mixes CE in).
  seqkd     CE on the teacher's own replies to the training prompts (Kim & Rush 2016):
            ``config.data.source = "generated:GEN"``, built first by
            ``kdlab generate-data --config=configs/lm_instruct.py:seqkd,... --out=GEN``.
  onpolicy  forward KL on the student's own replies to the training prompts (``config.on_policy.fraction = 1``).
  gkd       generalized JSD (beta = 0.5) on the student's replies for half of the batches (lambda = 0.5, GKD).
The prompts of seqkd and the on-policy variants are each example's chat up to the assistant's reply
(kdlab.data.prompts); replies end at the tokenizer's EOS or the template's end-of-turn token.

Options: ``teacher=DIR`` and ``data=SOURCE`` (required), ``student=DIR``, ``layers=N``, ``gen=DIR`` (seqkd's
data, default runs/lm_instruct/teacher_data), ``new=N`` (tokens sampled per reply, default 128),
``lambda=X`` (the on-policy fraction), ``temperature=T`` (sampling), ``ce=ALPHA``, ``steps=N``,
``seq_len=N``, ``batch=N``, ``lr=X``, ``dtype=bfloat16``, ``quick`` (a few tiny steps, for tests).
"""

from __future__ import annotations

import ml_collections

from common import generate_data, lm_training, on_policy, parse_arg
from lm_hf import student_model

VARIANTS = ("sft", "kd", "seqkd", "onpolicy", "gkd")
OPTIONS = ("teacher", "student", "data", "layers", "gen", "new", "lambda", "temperature", "ce", "steps", "seq_len",
           "batch", "lr", "dtype", "quick")
GENERATED = "runs/lm_instruct/teacher_data"

# variant -> (the divergence term or None for CE, on-policy fraction lambda or None)
_PLAN = {"sft": (None, None), "kd": ("kd", None), "seqkd": (None, None), "onpolicy": ("kd", 1.0),
         "gkd": ("jsd", 0.5)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, VARIANTS, default="onpolicy", options=OPTIONS)
  for required in ("teacher", "data"):
    if required not in options:
      raise ValueError(f"option {required}=... is required (teacher=a Hugging Face directory, data=jsonl:PATH)")
  quick = "quick" in options
  teacher, data = options["teacher"], options["data"]
  divergence, fraction = _PLAN[variant]
  if "lambda" in options:
    fraction = float(options["lambda"])
  seq_len = int(options.get("seq_len", 64 if quick else 1024))
  new = int(options.get("new", 8 if quick else 128))
  temperature = float(options.get("temperature", 1.0))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("fsdp", -1)]
  c.sharding_rules = []
  c.data = ml_collections.ConfigDict(dict(
      source=data, tokenizer=f"hf:{teacher}", seq_len=seq_len, chat_template=None, loss_mask="completion",
      packing=True, drop_long=False, validation_fraction=0.05,
      batch_size=int(options.get("batch", 2 if quick else 16)), eval_batch_size=2 if quick else 16,
      prefetch_threads=0))
  c.model = student_model(options, teacher, seq_len)
  c.init_from_teacher = None
  c.dtype = options.get("dtype")
  c.teachers = [dict(init=f"hf:{teacher}", eval_only=divergence is None, dtype=c.dtype)]
  alpha = float(options.get("ce", 0.0))
  if divergence is None:
    c.objective = [dict(loss="ce", weight=1.0)]
  else:
    term = dict(loss=divergence, temperature=1.0, weight=1.0 - alpha)
    c.objective = [dict(term, beta=0.5) if divergence == "jsd" else term] + (
        [dict(loss="ce", weight=alpha)] if alpha else [])
  c.on_policy = on_policy(fraction, new, temperature)
  c.generate_data = None
  if variant == "seqkd":
    c.data.source = "generated:" + options.get("gen", GENERATED)
    c.generate_data = generate_data(data, new, temperature)
  return lm_training(c, steps=int(options.get("steps", 4 if quick else 2000)),
                     learning_rate=float(options.get("lr", 1e-3 if quick else 1e-5)), log_every=1 if quick else 50)
