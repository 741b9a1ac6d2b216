"""Token-level distillation from a pretrained Hugging Face teacher into a smaller student of its family.

``--config=configs/lm_hf.py:VARIANT,teacher=DIR[,student=DIR][,OPTION=VALUE...]``

The teacher is the local Hugging Face directory ``teacher=DIR`` (``config.json``, safetensors,
``tokenizer.json``; llama, qwen2, qwen3 or gemma3), loaded straight into its sharded layout. The
text is ``pysrc`` (the standard library's own source) tokenized with the teacher's tokenizer. The
student is either another Hugging Face directory (``student=DIR``, e.g. Qwen2.5-0.5B for a
Qwen2.5-1.5B teacher) or a fresh model of the teacher's family with the teacher's widths and
``layers=N`` blocks (option ``init=0/2/4``: start from those teacher layers, DistilBERT-style).

Variants (the divergence, mixed with CE as ``ce=ALPHA``: ``ALPHA * CE + (1 - ALPHA) * divergence``):
  kd          forward KL(teacher || student) at temperature 1 (``impl=fused``: KL and CE in one fused pass, no [B, L, V] logits)
  reverse_kl  KL(student || teacher)
  jsd         generalized JSD(beta) (``beta=0.5``)
  ce          CE only (the teacher is evaluated against, not distilled from)

Options: ``teacher=DIR`` (required), ``student=DIR``, ``layers=N`` (fresh student blocks, default
half the teacher's), ``init=i/j/...``, ``steps=N``, ``seq_len=N``, ``batch=N``, ``lr=X``,
``dtype=bfloat16`` (student compute dtype; the teacher is stored in bfloat16 then too),
``impl=plain|chunked|fused``, ``quick`` (a few tiny steps, for tests).
"""

from __future__ import annotations

import pathlib

import ml_collections

from common import lm_training, parse_arg

VARIANTS = ("kd", "reverse_kl", "jsd", "ce")
OPTIONS = ("teacher", "student", "layers", "init", "steps", "seq_len", "batch", "lr", "dtype", "impl", "ce",
           "beta", "quick")


def _fresh_student(teacher: str, layers: int | None, seq_len: int) -> dict:
  """``dict(name=FAMILY, <the teacher's config.json fields>)`` with ``layers`` blocks (default half)."""
  from kdlab.models import pretrained
  if not (pathlib.Path(teacher) / "config.json").is_file():
    raise ValueError(f"teacher={teacher!r}: no config.json there; give a local Hugging Face model directory")
  hf = pretrained.read_hf_config(teacher)
  kwargs = pretrained.hf_kwargs(hf, teacher)
  kwargs["num_hidden_layers"] = layers or max(1, kwargs["num_hidden_layers"] // 2)
  for key in ("layer_types",):  # per-layer lists follow the teacher's first layers
    if kwargs.get(key):
      kwargs[key] = list(kwargs[key])[: kwargs["num_hidden_layers"]]
  return dict(name=pretrained.hf_family(hf, teacher), **kwargs, max_len=seq_len)


def student_model(options: dict[str, str], teacher: str, seq_len: int) -> ml_collections.ConfigDict:
  """``config.model``: the Hugging Face directory ``student=DIR`` with its weights, or a fresh model of
  the teacher's family with ``layers=N`` blocks (default half the teacher's)."""
  if "student" in options:
    return ml_collections.ConfigDict(dict(name="hf", path=options["student"], max_len=seq_len))
  layers = int(options["layers"]) if "layers" in options else None
  return ml_collections.ConfigDict(_fresh_student(teacher, layers, seq_len))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, VARIANTS, default="kd", options=OPTIONS)
  if "teacher" not in options:
    raise ValueError("option teacher=DIR is required (a local Hugging Face directory)")
  quick = "quick" in options
  teacher = options["teacher"]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("fsdp", -1)]  # FSDP over every device; add ("model", n) for tensor parallelism
  c.sharding_rules = []
  seq_len = int(options.get("seq_len", 32 if quick else 512))
  c.data = ml_collections.ConfigDict(dict(
      source="pysrc", tokenizer=f"hf:{teacher}", seq_len=seq_len,
      max_bytes=(16 << 10) if quick else (8 << 20), eval_max_bytes=(4 << 10) if quick else (256 << 10),
      batch_size=int(options.get("batch", 8 if quick else 32)), eval_batch_size=8 if quick else 32,
      prefetch_threads=0))
  c.model = student_model(options, teacher, seq_len)
  c.init_from_teacher = None
  if "init" in options:
    c.init_from_teacher = dict(layers=[int(i) for i in options["init"].split("/")], teacher=0)
  dtype = options.get("dtype")
  c.dtype = dtype
  c.teachers = [dict(init=f"hf:{teacher}", eval_only=variant == "ce", dtype=dtype)]
  impl = options.get("impl", "plain")
  alpha = float(options.get("ce", 0.5))
  divergence = {"kd": dict(loss="kd", temperature=1.0, impl=impl),
                "reverse_kl": dict(loss="reverse_kl", temperature=1.0, impl=impl),
                "jsd": dict(loss="jsd", beta=float(options.get("beta", 0.5)), temperature=1.0, impl=impl)}
  if variant in divergence:
    ce = dict(loss="ce", weight=alpha, **({"impl": "fused"} if impl == "fused" else {}))  # one fused pass with the KL
    c.objective = [dict(divergence[variant], weight=1.0 - alpha)] + ([ce] if alpha else [])
  else:
    c.objective = [dict(loss="ce", weight=1.0)]
  return lm_training(c, steps=int(options.get("steps", 4 if quick else 2000)),
                     learning_rate=float(options.get("lr", 1e-3 if quick else 1e-4)), log_every=2 if quick else 50)
