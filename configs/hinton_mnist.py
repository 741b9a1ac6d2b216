"""Hinton, Vinyals & Dean 2015 on MNIST: teacher, hard-label student, distilled student.

Run (teacher first, then the student that distills from it):
  kdlab train --config=configs/hinton_mnist.py:teacher --workdir=runs/hinton/teacher
  kdlab train --config=configs/hinton_mnist.py:student --workdir=runs/hinton/student
  kdlab train --config=configs/hinton_mnist.py:kd --workdir=runs/hinton/kd \\
      --config.teachers[0].init=runs/hinton/teacher/checkpoints

Variants (``arg`` is ``VARIANT[,key=value...]``):
  teacher  2x1200 ReLU, dropout 0.5 (0.2 on inputs), inputs jittered by up to 2 pixels.
  student  2x800 ReLU, hard labels only, no regularization.
  kd       2x800 ReLU, soft targets at T=20 from config.teachers[0] (weight 0.9) + hard labels (0.1).
Options: ``source=digits|mnist5k|tfds:mnist``, ``epochs=N``, ``omit=3`` (drop a digit from the
transfer set), ``quick`` (tiny run for tests).
"""

from __future__ import annotations

import ml_collections

from common import MLP_OPTIONS, mnist_mlp, parse_arg

OPTIONS = MLP_OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, ("teacher", "student", "kd"), default="kd", options=OPTIONS)
  c = mnist_mlp(variant, options)
  if variant == "kd":
    c.teachers = [dict(init="runs/hinton/teacher/checkpoints")]
    c.objective = [dict(loss="ce", weight=0.1), dict(loss="kd", weight=0.9, temperature=20.0)]
  return c
