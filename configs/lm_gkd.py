"""Sequence-level KD and on-policy distillation (GKD / MiniLLM) of the byte-level GPTs of ``lm_pysrc``.

Run (the teacher of configs/lm_pysrc.py first; every variant is evaluated against it):
  kdlab train --config=configs/lm_pysrc.py:teacher --workdir=runs/lm_pysrc/teacher
  kdlab train --config=configs/lm_gkd.py:student --workdir=runs/lm_gkd/student
  kdlab train --config=configs/lm_gkd.py:supervised_kd --workdir=runs/lm_gkd/supervised_kd
  kdlab generate-data --config=configs/lm_gkd.py:seqkd --out=runs/lm_gkd/teacher_data
  kdlab train --config=configs/lm_gkd.py:seqkd --workdir=runs/lm_gkd/seqkd
  kdlab train --config=configs/lm_gkd.py:gkd --workdir=runs/lm_gkd/gkd        (likewise the other variants)
(paper_repro/gkd2024/run.py runs them all, 3 seeds, and scores the students' samples with the teacher.)

Variants (``arg`` is ``VARIANT[,key=value...]``); the student and data are lm_pysrc's, the objective
is the variant's divergence alone at T = 1 (weight 1, no CE term; JSD with beta = 0.5):
  student         CE on the data only (the teacher is loaded for eval metrics only).
  supervised_kd   forward KL(p_teacher || p_student) on the data (token-level KD).
  seqkd           CE on the teacher's own continuations of the training prompts (Kim & Rush 2016):
                  ``config.data.source = "generated:DIR"``, built by ``kdlab generate-data`` with the
                  same config (its ``config.generate_data``).
  onpolicy_kd     forward KL on the student's own samples (``config.on_policy.fraction = 1``).
  onpolicy_rkl    reverse KL(p_student || p_teacher) on the student's samples (MiniLLM's single-step term).
  gkd             generalized JSD, beta = 0.5, on-policy for half of the batches (lambda = 0.5; GKD).
  gkd_full        generalized JSD, beta = 0.5, always on-policy (lambda = 1).
Options: ``teacher=PATH`` (the teacher's checkpoints/), ``gen=DIR`` (seqkd's data), ``new=N`` (tokens
generated per sequence; the prompt is the sequence's first ``seq_len - N`` tokens), ``lambda=X`` (override
the on-policy fraction), ``temperature=T`` (sampling temperature of the student and of generate-data),
``sum`` (divergences summed over a sequence's tokens instead of averaged: no length normalization),
``steps=N``, ``quick`` (tiny models and a few steps, for tests).

Sizes: lm_pysrc's (128-byte sequences, batch 32, 600 steps; the student d_model 128, 2 layers); on-policy
and generated continuations are 64 bytes after a 64-byte prompt (quick: 16 after 16).
"""

from __future__ import annotations

import ml_collections

from common import generate_data, on_policy, parse_arg
from lm_pysrc import get_config as lm_config

VARIANTS = ("student", "supervised_kd", "seqkd", "onpolicy_kd", "onpolicy_rkl", "gkd", "gkd_full")
OPTIONS = ("teacher", "gen", "new", "lambda", "temperature", "sum", "steps", "impl", "quick")
GENERATED = "runs/lm_gkd/teacher_data"

# variant -> (lm_pysrc variant, the divergence term or None for CE, on-policy fraction lambda or None)
_PLAN = {
    "student": ("student", None, None),
    "supervised_kd": ("kd", "kd", None),
    "seqkd": ("student", None, None),
    "onpolicy_kd": ("kd", "kd", 1.0),
    "onpolicy_rkl": ("reverse_kl", "reverse_kl", 1.0),
    "gkd": ("jsd", "jsd", 0.5),
    "gkd_full": ("jsd", "jsd", 1.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, VARIANTS, default="gkd", options=OPTIONS)
  base, divergence, fraction = _PLAN[variant]
  passed = [f"{k}={v}" if v else k for k, v in options.items() if k in ("teacher", "steps", "quick", "impl")]
  c = lm_config(",".join([base, *passed]))
  if divergence is not None:
    # The divergence alone, pinned here: lm_pysrc's own distillation recipe (CE mixing, warm-up,
    # JSD beta) is tuned for off-policy token KD and must not change these methods' results.
    term = dict(loss=divergence, temperature=1.0, impl=options.get("impl", "plain"), weight=1.0)
    c.objective = [dict(term, beta=0.5) if divergence == "jsd" else term]
  quick = "quick" in options
  new = int(options.get("new", 16 if quick else 64))
  temperature = float(options.get("temperature", 1.0))
  if "lambda" in options:
    fraction = float(options["lambda"])
  if divergence is not None and "sum" in options:
    c.objective[0]["length_normalize"] = False
  c.on_policy = on_policy(fraction, new, temperature)
  c.generate_data = None
  if variant == "seqkd":
    c.data.source = "generated:" + options.get("gen", GENERATED)
    c.generate_data = generate_data("pysrc", new, temperature)
  return c
