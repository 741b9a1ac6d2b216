"""Born-again networks (Furlanello et al. 2018) on MNIST 5k: generations 0..3, 3 seeds, and their ensemble.

  python paper_repro/ban2018/run.py --seeds 3 --generations 3 --workdir runs/ban2018

Each seed trains a chain (configs/self_distill_mnist.py:ban): generation 0 on labels, generation k
from a fresh init distilled from generation k-1 (cross-entropy to its output, T = 1). Writes
results.md with the test accuracy per generation and of the ensemble of generations 1..K (mean
+/- std over seeds) beside the paper's CIFAR figures. Finished chains and generations are reused.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from kdlab.config import load
from kdlab.repro import mean_std, run_cached

HERE = pathlib.Path(__file__).parent
CONFIG = HERE.parent.parent / "configs" / "self_distill_mnist.py"

# Furlanello et al. 2018 (abstract and tables): DenseNet BAN validation error, CIFAR-10 3.5 %,
# CIFAR-100 15.5 %, ensemble of generations 14.9 % on CIFAR-100; the same-architecture students
# outperform their teachers.
PAPER = ("DenseNet born-again students: 3.5% CIFAR-10 and 15.5% CIFAR-100 validation error; "
         "ensemble of generations 14.9% on CIFAR-100; students of the same architecture outperform their teacher.")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--generations", type=int, default=3)
  parser.add_argument("--source", default="mnist5k")
  parser.add_argument("--epochs", type=float, default=None, help="epochs per generation (default: the config's)")
  parser.add_argument("--workdir", default="runs/ban2018")
  parser.add_argument("--out", default=str(HERE / "results.md"))
  args = parser.parse_args(argv)
  chains = []
  for seed in range(args.seeds):
    arg = f"ban,source={args.source},generations={args.generations}" + (f",epochs={args.epochs}" if args.epochs else "")
    config = load(f"{CONFIG}:{arg}")
    config.seed = seed * 100  # Generation k uses seed + k: keep the chains' seeds apart.
    chains.append(run_cached(config, pathlib.Path(args.workdir) / args.source / f"seed{seed}"))
  n = chains[0]["test_examples"]
  rows = [f"| model | test accuracy % (mean +/- std) | test errors (of {n}) |", "|---|---|---|"]
  for k in range(args.generations + 1):
    accs = [c["generations"][k]["test_accuracy"] for c in chains]
    errs = [c["generations"][k]["test_errors"] for c in chains]
    label = "generation 0 (labels only: the first teacher)" if k == 0 else f"generation {k} (born again from {k - 1})"
    rows.append(f"| {label} | {mean_std(accs, '{:.2f}', 100)} | {mean_std(errs)} |")
  accs = [c["ensemble_test_accuracy"] for c in chains]
  errs = [c["ensemble_test_errors"] for c in chains]
  rows.append(f"| ensemble of generations 1..{args.generations} | {mean_std(accs, '{:.2f}', 100)} | {mean_std(errs)} |")
  gen = [[c["generations"][k]["test_accuracy"] for c in chains] for k in range(args.generations + 1)]
  better = sum(g > gen[0][i] for i, g in enumerate(gen[1]))
  text = "\n".join([
      f"# Born-again networks on `{args.source}`: paper vs kdlab", "",
      f"Produced by `python paper_repro/ban2018/run.py --seeds {args.seeds} --generations {args.generations}` "
      f"here; the chains trained for {sum(c['wall_time_s'] for c in chains):.0f} s in all. Model: the 2x800 MLP (dropout 0.2) of "
      f"`configs/self_distill_mnist.py:ban`; {args.seeds} seeds.", "",
      *rows, "",
      f"**Paper (Furlanello et al. 2018, CIFAR, not comparable in absolute terms):** {PAPER}", "",
      f"**Ours:** generation 1 beats its teacher (generation 0) in {better} of {args.seeds} seeds; "
      f"mean accuracy by generation: " + ", ".join(f"{100 * sum(g) / len(g):.2f}%" for g in gen) + ".", "",
  ])
  if better < args.seeds:
    text += "\n".join([
        "**Where ours disagrees, and why we think so.** On 4,000 MNIST digits the label-trained generation 0 fits "
        "its training set almost perfectly, so its T = 1 outputs on the transfer set (the same training images) are "
        "close to one-hot: the next generation receives little information beyond the labels, and with the "
        "labels dropped from its loss it inherits its teacher's mistakes on top of its own; the small drop "
        "compounds over generations. The paper's DenseNets on CIFAR keep non-trivial secondary probabilities on their training "
        "data. A softer transfer (higher temperature, or CE + KD as in `configs/hinton_mnist.py:kd`, which does "
        "help here, see paper_repro/hinton2015) is the lever; this runner keeps the paper's loss.", ""])
  pathlib.Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
