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

VARIANTS = ("teacher", "student", "kd")


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
  parts = [p for p in (arg or "kd").split(",") if p]
  variant, options = parts[0], {}
  for p in parts[1:]:
    key, _, value = p.partition("=")
    options[key] = value
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  return variant, options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg)
  source = options.get("source", "mnist5k")
  in_features = 64 if source == "digits" else 784
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", -1)]
  c.sharding_rules = []
  c.data = ml_collections.ConfigDict(dict(
      source=source, data_dir=None, batch_size=100, eval_batch_size=512,
      augment="jitter" if variant == "teacher" else None,
      mean=(0.0,), std=(1.0,),
      exclude_labels=[int(d) for d in options["omit"].split("/")] if "omit" in options else []))
  c.model = ml_collections.ConfigDict(dict(
      name="mlp", in_features=in_features, num_classes=10,
      hidden=(1200, 1200) if variant == "teacher" else (800, 800),
      dropout=0.5 if variant == "teacher" else 0.0,
      input_dropout=0.2 if variant == "teacher" else 0.0))
  c.teachers = []
  c.objective = [dict(loss="ce", weight=1.0)]
  if variant == "kd":
    c.teachers = [dict(init="runs/hinton/teacher/checkpoints")]
    c.objective = [dict(loss="ce", weight=0.1), dict(loss="kd", weight=0.9, temperature=20.0)]
  epochs = float(options.get("epochs", 60 if variant == "teacher" else 40))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1 if variant == "teacher" else 0.05, momentum=0.9, nesterov=False,
      weight_decay=0.0, schedule="cosine", warmup_epochs=0.0, boundaries_epochs=[], decay=0.1))
  c.train = ml_collections.ConfigDict(dict(
      num_epochs=epochs, num_steps=0, log_every_steps=40, eval_every_epochs=5.0, checkpoint_every_epochs=5.0))
  c.wandb_project = "kdlab"
  if "quick" in options:
    c.data.batch_size = 40
    c.model.hidden = (64, 64)
    c.model.dropout = min(c.model.dropout, 0.1)
    c.model.input_dropout = 0.0
    if source == "digits":
      c.data.augment = None  # +/-2 pixels is a quarter of an 8x8 image.
    c.train.num_epochs = 1.0
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
    c.train.eval_every_epochs = 0.5
    c.train.checkpoint_every_epochs = 0.25
    c.train.log_every_steps = 10
  return c
