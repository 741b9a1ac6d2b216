"""A small llama teacher and its quarter-size students on the stdlib instruction data (paper_repro/llm_distill).

``--config=configs/llm_distill.py:VARIANT,data=DIR[,teacher=HF_DIR][,OPTION=VALUE...]``

``data=DIR`` is the output of ``paper_repro/llm_distill/build_data.py``: prompt/completion records
in ``DIR/data/{train,validation}`` (signature and docstring -> body of stdlib functions) and two BPE
tokenizers, ``DIR/tok_main`` (the teacher's and the same-tokenizer students') and ``DIR/tok_alt``
(the cross-tokenizer student's). The loss counts the completion's tokens only (its EOS included).

Variants:
  teacher     the teacher: llama, CE on the completions (examples packed into rows).
  sft         the student, CE only (supervised fine-tuning; the teacher is evaluated against).
  kd          forward KL(teacher || student) on the data's completions, mixed with CE (``ce=ALPHA``).
  cache       the same KD from the teacher's top-k cache (``topk_kd``; ``cache=DIR`` built by
              ``kdlab cache-teacher`` with this variant's config, ``config.teacher_cache_k = k``).
  reverse_kl  reverse KL(student || teacher) on the data, mixed with CE.
  jsd         generalized JSD(beta=0.5) on the data, mixed with CE.
  seqkd       CE on the teacher's sampled replies (temperature 1) to the training prompts (``gen=DIR``,
              built by ``kdlab generate-data`` with this variant's config).
  gkd         on-policy GKD: JSD(0.5) on the student's own replies for half of the batches (lambda 0.5).
  xtok        a student with the other tokenizer (``tok_alt``): ``aligned_kd`` (chunk likelihoods)
              and ``uld`` (sorted-probability Wasserstein) against the teacher's own tokenization, with CE.

Students are the ``SIZES["student"]`` llama (about a quarter of the teacher's parameters), every
example in its own row (``packing=False``: the cross-tokenizer pipeline needs it, and every student
then sees the same batches of examples). Options: ``data=DIR`` (required), ``teacher=DIR`` (the
exported teacher, a Hugging Face directory; required but for ``teacher``), ``cache=DIR``, ``gen=DIR``, ``k=N`` (cache top-k, default 64), ``ce=ALPHA`` (default 0.5), ``new=N``
(tokens per reply, default 64), ``steps=N`` (default 1000), ``batch=N``, ``lr=X``, ``seq_len=N``,
``size=tiny`` (the --quick models), ``quick`` (tiny models, a few steps, for tests).
"""

from __future__ import annotations

import ml_collections

from common import generate_data, lm_training, on_policy, parse_arg

VARIANTS = ("teacher", "sft", "kd", "cache", "reverse_kl", "jsd", "seqkd", "gkd", "xtok")
OPTIONS = ("data", "teacher", "cache", "gen", "k", "ce", "new", "steps", "batch", "lr", "seq_len",
           "size", "quick")

# Llama shapes: (hidden, intermediate, layers, heads, kv heads). With the 2048-token vocabulary the
# student has about a quarter of the teacher's parameters (1.31M vs 0.36M, 28%; embeddings untied).
SIZES = {
    "teacher": (128, 384, 4, 4, 2),
    "student": (64, 192, 2, 4, 2),
    "tiny_teacher": (32, 64, 2, 2, 1),
    "tiny_student": (16, 32, 1, 2, 1),
}


def llama(size: str, vocab_size: int, max_len: int) -> dict:
  """The model dict of a ``SIZES[size]`` llama."""
  hidden, inter, layers, heads, kv = SIZES[size]
  return dict(name="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5,
              max_position_embeddings=max_len, tie_word_embeddings=False, max_len=max_len)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, VARIANTS, default="kd", options=OPTIONS)
  if "data" not in options:
    raise ValueError("option data=DIR is required (the output of paper_repro/llm_distill/build_data.py)")
  if variant != "teacher" and "teacher" not in options:
    raise ValueError("option teacher=DIR is required (the exported teacher, a Hugging Face directory)")
  quick = "quick" in options
  tiny = quick or options.get("size") == "tiny"
  data, teacher = options["data"].rstrip("/"), options.get("teacher")
  xtok = variant == "xtok"
  seq_len = int(options.get("seq_len", 192 if xtok else 160))
  new = int(options.get("new", 16 if quick else 64))
  alpha = float(options.get("ce", 0.5))
  tok = f"hf:{data}/tok_alt" if xtok else f"hf:{data}/tok_main"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", -1)]
  c.sharding_rules = []
  c.data = ml_collections.ConfigDict(dict(
      source=f"jsonl:{data}/data", tokenizer=tok, seq_len=seq_len, chat_template=False, loss_mask="completion",
      packing=variant == "teacher", drop_long=True, validation_fraction=0.05,
      batch_size=int(options.get("batch", 4 if quick else 16)), eval_batch_size=4 if quick else 32,
      prefetch_threads=0))
  if xtok:
    c.data.teacher_tokenizer = f"hf:{data}/tok_main"
    c.data.teacher_seq_len = 160
  vocab = 1536 if xtok else 2048
  if variant == "teacher":
    c.model = llama("tiny_teacher" if tiny else "teacher", vocab, seq_len)
  else:
    c.model = llama("tiny_student" if tiny else "student", vocab, seq_len)
  c.model = ml_collections.ConfigDict(c.model)
  c.init_from_teacher = None
  c.dtype = None
  c.teachers = [] if variant == "teacher" else [dict(init=f"hf:{teacher}", eval_only=variant in ("sft", "seqkd"))]
  kl = dict(temperature=1.0)
  plan = {"teacher": [], "sft": [], "seqkd": [],
          "kd": [dict(loss="kd", **kl)], "cache": [dict(loss="topk_kd", **kl)],
          "reverse_kl": [dict(loss="reverse_kl", **kl)], "jsd": [dict(loss="jsd", beta=0.5, **kl)],
          "gkd": [dict(loss="jsd", beta=0.5, **kl)],
          "xtok": [dict(loss="aligned_kd", **kl), dict(loss="uld", **kl)]}[variant]
  if not plan:
    c.objective = [dict(loss="ce", weight=1.0)]
  elif variant == "gkd":  # GKD: the divergence alone, on- and off-policy batches
    c.objective = [dict(plan[0], weight=1.0)]
  else:
    share = (1.0 - alpha) / len(plan)
    c.objective = [dict(term, weight=share) for term in plan] + ([dict(loss="ce", weight=alpha)] if alpha else [])
  c.on_policy = on_policy(0.5 if variant == "gkd" else None, new, 1.0)
  c.generate_data = None
  if variant == "seqkd":
    c.data.source = "generated:" + options.get("gen", f"{data}/teacher_data")
    c.generate_data = generate_data(f"jsonl:{data}/data", new, 1.0)
  c.teacher_cache = options.get("cache") if variant == "cache" else None
  c.teacher_cache_k = int(options.get("k", 8 if quick else 64))
  return lm_training(c, steps=int(options.get("steps", 4 if quick else 1000)),
                     learning_rate=float(options.get("lr", 3e-3)), log_every=2 if quick else 50, keep=1)
