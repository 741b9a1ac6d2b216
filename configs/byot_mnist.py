"""Be Your Own Teacher (Zhang et al. 2019) on MNIST 5k: a resnet8 with exits on stage1 and stage2.

  kdlab train --config=configs/byot_mnist.py --workdir=runs/byot

Loss, with the paper's defaults alpha = 0.1, lambda = 1e-6, T = 3 (all configurable by override):
CE on the deepest exit; for every shallow exit i: (1 - alpha) * CE(exit i) + alpha * KD(exit i <-
deepest, T) + lambda * ||feature_i - deepest feature||^2 (the deepest exit is the stop-gradient
teacher: from_teacher="self"). The evaluation reports each exit's accuracy and the ensemble of
exits (test/accuracy_exit{i}, test/accuracy_exits_ensemble). Options: ``base=MODEL`` (any zoo ResNet
or WRN), ``source``, ``epochs=N``, ``quick``.
"""

from __future__ import annotations

import ml_collections

from common import MLP_OPTIONS, mnist_mlp, parse_arg

OPTIONS = ("base", *MLP_OPTIONS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  _, options = parse_arg(arg, ("byot",), default="byot", options=OPTIONS)
  c = mnist_mlp("student", options)
  source = c.data.source
  shape = (8, 8, 1) if source == "digits" else (28, 28, 1)
  exits = ("stage1", "stage2")
  c.model = ml_collections.ConfigDict(dict(
      name="byot", base=options.get("base", "resnet8"), exits=exits, num_classes=10, input_shape=shape,
      in_channels=1))
  alpha, lam, temperature = 0.1, 1e-6, 3.0
  c.objective = [dict(loss="ce", weight=1.0)]
  for i in range(1, len(exits) + 1):
    c.objective += [
        dict(loss="ce", name=f"ce_exit{i}", student=f"exit{i}_logits", weight=1.0 - alpha),
        dict(loss="kd", name=f"kd_exit{i}", student=f"exit{i}_logits", teacher="logits", from_teacher="self",
             temperature=temperature, weight=alpha),
        dict(loss="fitnet", name=f"feat_exit{i}", student=f"exit{i}_feat", teacher="pool", from_teacher="self",
             weight=lam),
    ]
  c.optimizer.learning_rate = 0.05
  c.optimizer.weight_decay = 5e-4
  c.train.num_epochs = float(options.get("epochs", 10 if "quick" not in options else 1))
  c.train.eval_every_epochs = 2.0 if "quick" not in options else 0.5
  return c
