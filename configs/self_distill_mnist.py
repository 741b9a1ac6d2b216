"""Self-distillation on MNIST 5k: born-again chains and an EMA self-teacher.

  kdlab train --config=configs/self_distill_mnist.py:ban --workdir=runs/ban
  kdlab train --config=configs/self_distill_mnist.py:ema --workdir=runs/ema

Variants (``arg`` is ``VARIANT[,key=value...]``):
  ban  born-again networks (Furlanello et al. 2018): generation 0 on labels, generations 1..K
       (``generations=K``, default 3) from fresh inits distilled from the previous one with the
       paper's loss: cross-entropy to the teacher's output at T=1 (``kd`` at T=1); the summary
       also reports the ensemble of generations 1..K.
  ema  the teacher is an exponential moving average of the student (decay 0.99, updated inside the
       jitted step); objective CE + KD from the teacher named "ema".
Options: ``source=digits|mnist5k``, ``epochs=N``, ``quick`` (tiny run for tests).
The model is the 2x800 MLP of the Hinton et al. 2015 student with dropout 0.2.
"""

from __future__ import annotations

import ml_collections

from common import MLP_OPTIONS, mnist_mlp, parse_arg

OPTIONS = ("generations", *MLP_OPTIONS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, ("ban", "ema"), default="ban", options=OPTIONS)
  c = mnist_mlp("student", options)
  c.model.dropout = 0.2 if "quick" not in options else 0.0
  if variant == "ban":
    c.born_again = ml_collections.ConfigDict(dict(
        generations=int(options.get("generations", 3)), ensemble=True, first_objective=[dict(loss="ce", weight=1.0)]))
    c.objective = [dict(loss="kd", weight=1.0, temperature=1.0)]
  else:
    c.ema_teacher = ml_collections.ConfigDict(dict(decay=0.99))
    c.objective = [dict(loss="ce", weight=0.5), dict(loss="kd", weight=0.5, temperature=2.0, from_teacher="ema")]
  return c
