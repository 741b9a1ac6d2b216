"""Born-again networks (Furlanello et al. 2018): a chain of same-architecture generations.

``config.born_again = dict(generations=K, ensemble=True)``: generation 0
trains on labels alone (``config.born_again.first_objective``, default CE);
generation k (1..K) starts from a fresh initialization (seed + k) and is
trained with ``config.objective`` whose teacher is generation k-1 (the
teacher named ``"previous"``, index 0). Each generation is an ordinary run in
``WORKDIR/gen{k}``, so a chain killed within or between generations resumes
where it stopped. With ``ensemble=True`` the summary also reports the
ensemble (mean of probabilities) of generations 1..K, as in the paper.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import ml_collections
from flax import nnx

from kdlab import distributed
from kdlab.errors import UserError
from kdlab.files import write_json
from kdlab.objective import build as build_objective
from kdlab.train.evaluate import evaluate_ensemble
from kdlab.train.prepare import check_workdir, prepare


def generation_config(config: ml_collections.ConfigDict, workdir: pathlib.Path, k: int) -> ml_collections.ConfigDict:
  """The ordinary run config of generation ``k``."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.born_again = None
  c.seed = config.seed + k
  if k == 0:
    c.teachers = []
    c.objective = list(config.born_again.get("first_objective") or [dict(loss="ce", weight=1.0)])
  else:
    c.teachers = [dict(init=str(workdir / f"gen{k - 1}" / "checkpoints"), name="previous")]
  return c


def train_chain(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                train_run: Callable[..., dict[str, Any]], *, use_wandb: bool = True,
                progress: bool = True) -> dict[str, Any]:
  """Trains generations 0..K in ``workdir/gen{k}`` and writes ``workdir/summary.json``.

  ``train_run(config, workdir, use_wandb=..., progress=...)`` trains one generation (the loop's
  :func:`kdlab.train.loop.train_run`, which calls this module for chains).
  """
  workdir = pathlib.Path(workdir)
  generations = config.born_again.generations
  if not isinstance(generations, int) or generations < 1:
    raise UserError(f"config.born_again.generations must be an integer >= 1, got {generations!r}")
  if config.teachers:
    raise UserError("config.teachers must be empty with config.born_again: each generation's teacher is the previous one")
  # Validate generation 0 fully and the later generations' objective against a same-architecture teacher,
  # before anything is trained.
  setup = prepare(generation_config(config, workdir, 0))
  shapes = dataclasses.replace(setup.shapes, teachers=[setup.shapes.student], teacher_names=["previous"])
  build_objective(config.objective, shapes, nnx.Rngs(0))

  config_json = config.to_json(indent=2, sort_keys=True)
  check_workdir(workdir, config_json)
  distributed.agree(None)  # Several processes: all validated before the chain's first write.
  if distributed.is_writer():
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_json)
  summaries = []
  for k in range(generations + 1):
    summaries.append(train_run(generation_config(config, workdir, k), workdir / f"gen{k}",
                               use_wandb=use_wandb, progress=progress))
  summary: dict[str, Any] = {
      "generations": [{"generation": k, "test_accuracy": s["test_accuracy"], "test_errors": s["test_errors"],
                       "best_test_accuracy": s["best_test_accuracy"]} for k, s in enumerate(summaries)],
      "test_accuracy": summaries[-1]["test_accuracy"],
      "test_errors": summaries[-1]["test_errors"],
      "test_examples": summaries[-1]["test_examples"],
      "wall_time_s": sum(s["wall_time_s"] for s in summaries),
  }
  if config.born_again.get("ensemble"):
    members = [workdir / f"gen{k}" / "checkpoints" for k in range(1, generations + 1)]
    ensemble = evaluate_ensemble(members, generation_config(config, workdir, 0))
    summary["ensemble_test_accuracy"] = ensemble["test/accuracy"]
    summary["ensemble_test_errors"] = int(ensemble["test/errors"])
  if distributed.is_writer():
    write_json(workdir / "summary.json", summary)
  return summary
