"""Temperature x alpha ablation of Hinton KD: the 2x800 MLP student on mnist5k, 3 seeds.

T in {1, 2, 4, 8, 20} x alpha in {0.1, 0.5, 0.9}, where alpha is the weight of the KD term
(``objective[1].weight``) and 1 - alpha that of the hard-label CE (``objective[0].weight``). A grid
is a product over its keys, so the two weights are tied: the tuple key sets both paths from one
value tuple, giving 5 x 3 = 15 settings x 3 seeds = 45 runs. ``kd`` uses the Hinton T^2 scaling,
so alpha weighs comparable gradient magnitudes at every T.

Run it (teacher once, then the sweep at 20 epochs per student, then the report; about 20 minutes
on 2 CPU cores, see the script):
  sh experiments/run_temperature_alpha.sh [--parallel 2]
which is
  kdlab train --config=configs/hinton_mnist.py:teacher --workdir=runs/temperature_alpha/teacher
  kdlab sweep --config=configs/hinton_mnist.py:kd --sweep=experiments/temperature_alpha.py \\
      --workdir=runs/temperature_alpha/sweep --config.teachers[0].init=runs/temperature_alpha/teacher/checkpoints \\
      --config.train.num_epochs=20
  kdlab report runs/temperature_alpha/sweep
``--sweep=experiments/temperature_alpha.py:tiny`` is a 2 x 2 grid with one seed for smoke tests
(``QUICK=1 sh experiments/run_temperature_alpha.sh`` runs it on digits with the ``quick`` configs).
"""

ALPHA = ("objective[0].weight", "objective[1].weight")  # (1 - alpha, alpha): CE weight, KD weight.


def get_sweep(arg: str | None = None) -> dict:
  temperatures, alphas, seeds = [1.0, 2.0, 4.0, 8.0, 20.0], [0.1, 0.5, 0.9], [0, 1, 2]
  if arg == "tiny":
    temperatures, alphas, seeds = [1.0, 4.0], [0.1, 0.9], [0]
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use no variant or 'tiny'")
  return {
      "name": "temperature_alpha" + ("_tiny" if arg else ""),
      "seeds": seeds,
      "grid": {
          "objective[1].temperature": temperatures,
          ALPHA: [(round(1.0 - a, 6), a) for a in alphas],
      },
      "labels": {"objective[1].temperature": "T", "objective[1].weight": "alpha (KD weight)"},
  }
