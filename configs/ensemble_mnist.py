"""Distilling an ensemble of teachers into one student (Hinton et al. 2015, section 4) on MNIST 5k.

  # after training teachers t0..t4 with configs/hinton_mnist.py:teacher and seeds 0..4:
  kdlab train --config=configs/ensemble_mnist.py:ensemble,teachers=5 --workdir=runs/ens \\
      --config.teachers[0].init=runs/t0/checkpoints ...   (paper_repro/ensemble/run.py does all this)

Variants: ``ensemble`` (KD at T=20 from the mean of the teachers' softened probabilities,
``combine="mean_probs"``), ``single`` (the same from teacher t0 alone). Options: ``teachers=N``
(default 5), ``teacher_dir=DIR`` (teachers are DIR/t{i}/checkpoints), ``source``, ``epochs``, ``quick``.
"""

from __future__ import annotations

import ml_collections

from common import MLP_OPTIONS, mnist_mlp, parse_arg

OPTIONS = ("teachers", "teacher_dir", *MLP_OPTIONS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, ("ensemble", "single"), default="ensemble", options=OPTIONS)
  c = mnist_mlp("student", options)
  n = int(options.get("teachers", 5)) if variant == "ensemble" else 1
  root = options.get("teacher_dir", "runs/ensemble/teachers")
  c.teachers = [dict(init=f"{root}/t{i}/checkpoints", name=f"t{i}") for i in range(n)]
  kd = dict(loss="kd", weight=0.9, temperature=20.0)
  if variant == "ensemble":
    kd.update(from_teachers=[f"t{i}" for i in range(n)], combine="mean_probs")
  c.objective = [dict(loss="ce", weight=0.1), kd]
  return c
