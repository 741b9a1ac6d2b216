"""Range checks of a run config's numeric fields, the first thing ``prepare`` does.

A value out of range (a batch of 0 examples, a negative seed, evaluation every -1 epochs, a dropout
of 1.5) is refused here with one line naming the field, before any data is read, any model built
or anything written; the optimizer's fields are checked by :func:`kdlab.train.optim.make`, the
mesh by :func:`kdlab.mesh.make_mesh`, the objective's terms by their builders.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import ml_collections

from kdlab import config as kconfig
from kdlab.errors import UserError

# Seeds go to grain (``seed + 1`` for augmentation), which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 2


def _whole(low: int) -> Callable[[Any], bool]:
  return lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= low


def _number(low: float, *, strict: bool, below: float | None = None) -> Callable[[Any], bool]:
  def ok(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
      return False
    return (v > low if strict else v >= low) and (below is None or v < below)
  return ok


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: v is None or ok(v)


# field -> (in range?, the valid values, what the field means, an example). A field a config lacks is skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str, str, str]] = {
    "vmap_seeds": (_whole(0), "a whole number >= 0", "seeds trained in one vmapped step; 0 or 1: one", "0"),
    "connector_warmup_steps": (_whole(0), "a whole number >= 0", "steps that train only the connectors", "0"),
    "data.batch_size": (_whole(1), "a whole number >= 1", "training examples per step", "64"),
    "data.eval_batch_size": (_whole(1), "a whole number >= 1", "examples per evaluation batch", "512"),
    "train.num_steps": (_whole(0), "a whole number >= 0", "training steps; 0: train.num_epochs decides", "0"),
    "train.num_epochs": (_number(0, strict=False), "a number >= 0", "epochs of training", "10.0"),
    "train.log_every_steps": (_whole(1), "a whole number >= 1", "steps between training log lines", "50"),
    "train.eval_every_epochs": (_number(0, strict=True), "a number > 0",
                                "epochs between evaluations; the last step is always evaluated", "1.0"),
    "train.checkpoint_every_epochs": (_number(0, strict=True), "a number > 0",
                                      "epochs between checkpoints; the last step is always saved", "1.0"),
    "train.microbatches": (_whole(1), "a whole number >= 1", "slices of each batch; 1: no gradient accumulation",
                           "1"),
    "train.token_normalization": (lambda v: isinstance(v, str) and v in ("sequence", "global"),
                                  "'sequence' or 'global'", "how token losses are averaged: per sequence, or per "
                                  "token over the whole global batch", "global"),
    "train.max_loss": (_optional(_number(0, strict=True)), "None or a number > 0",
                       "a logged mean train loss above it stops the run; None: off", "10.0"),
    "checkpoint.keep": (_whole(1), "a whole number >= 1", "the latest checkpoints kept", "2"),
    # The metric's name is checked against the run's eval metrics where they are known (before training).
    "checkpoint.best_metric": (_optional(lambda v: isinstance(v, str) and bool(v)), "None or an eval metric's name",
                               "the checkpoint of its best value is kept; None: none", "test/accuracy"),
    "checkpoint.best_mode": (_optional(lambda v: isinstance(v, str) and v in ("max", "min")), "None, 'max' or 'min'",
                             "whether the best_metric's best value is its largest; None: by its name", "max"),
}
DROPOUT = (_number(0, strict=False, below=1.0), "a number in [0, 1)", "the probability of dropping a unit", "0.1")
# config.model sizes (of any model that has them): whole numbers >= 1, or lists of them (the MLP's hidden).
MODEL_SIZES = ("hidden", "in_features", "num_classes", "in_channels", "d_model", "num_layers", "num_heads",
               "vocab_size", "max_len", "mlp_ratio")
# Fields that are lists (of dicts for teachers and objective terms).
LISTS = {"teachers": "[dict(init='runs/teacher/checkpoints')]", "objective": "[dict(loss='ce', weight=1.0)]",
         "sharding_rules": "[('embed', 'fsdp')]"}


def _get(config: ml_collections.ConfigDict, path: str) -> tuple[bool, Any]:
  node: Any = config
  for key in path.split("."):
    if not hasattr(node, "get") or key not in node:
      return False, None
    node = node[key]
  return True, node


def check(config: ml_collections.ConfigDict) -> None:
  """Every numeric field of ``config`` with a fixed valid range (:data:`RULES`, the model's dropouts,
  the seed) is in it; else a :class:`UserError` ``config.FIELD=VALUE: must be ...; use e.g. ...``."""
  for path, rule in RULES.items():
    present, value = _get(config, path)
    if present and not rule[0](value):
      _refuse(path, value, rule)
  _check_model(config.get("model"))
  _check_structure(config)
  _check_seed(config)


def _check_model(model: Any) -> None:
  if not hasattr(model, "items"):
    raise UserError(f"config.model={kconfig.show(model)}: not a dict of the model's fields; use e.g. "
                    f"--config.model={{'name': 'mlp', 'hidden': (64, 64)}}")
  for key, value in model.items():
    if key.endswith("dropout") and value is not None and not DROPOUT[0](value):
      _refuse(f"model.{key}", value, DROPOUT)
    if key in MODEL_SIZES and value is not None:
      is_list = isinstance(value, (list, tuple))
      if is_list != (key == "hidden") or not all(_whole(1)(v) for v in (value if is_list else [value])):
        what = "a list of whole numbers >= 1" if key == "hidden" else "a whole number >= 1"
        raise UserError(f"config.model.{key}={kconfig.show(value)}: must be {what} (a size of the model); "
                        f"fix config.model.{key}")


def _check_structure(config: ml_collections.ConfigDict) -> None:
  """The list fields are lists (teachers and objective terms of dicts); optional sections None or dicts."""
  for key, example in LISTS.items():
    value = config.get(key)
    if key in config and not isinstance(value, (list, tuple)):
      raise UserError(f"config.{key}={kconfig.show(value)}: must be a list; use e.g. --config.{key}=\"{example}\"")
    if key != "sharding_rules":
      for i, entry in enumerate(value or ()):
        if not hasattr(entry, "get"):
          raise UserError(f"config.{key}[{i}]={kconfig.show(entry)}: must be a dict; use e.g. {example[1:-1]}")
  for key, example in kconfig.SECTIONS.items():
    value = config.get(key)
    if value is not None and not hasattr(value, "get"):
      raise UserError(f"config.{key}={kconfig.show(value)}: must be None (off) or a dict; use e.g. "
                      f"--config.{key}=\"{example}\"")


def _refuse(path: str, value: Any, rule: tuple[Any, str, str, str]) -> None:
  _, valid, meaning, example = rule
  raise UserError(f"config.{path}={kconfig.show(value)}: must be {valid} ({meaning}); "
                  f"use e.g. --config.{path}={example}")


def _check_seed(config: ml_collections.ConfigDict) -> None:
  """``config.seed`` and every seed derived from it (vmapped seeds, born-again generations) fit grain's range."""
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise UserError(f"config.seed={seed!r}: must be a whole number >= 0; use e.g. --config.seed=0")
  extra = max(int(config.get("vmap_seeds") or 1) - 1, 0)
  born_again = config.get("born_again")
  generations = born_again.get("generations") if hasattr(born_again, "get") else None
  if isinstance(generations, int) and not isinstance(generations, bool) and generations > 0:
    extra += generations
  if seed + extra > MAX_SEED:
    raise UserError(f"config.seed={seed}: too large, the run uses seeds up to {seed + extra} but seeds must fit in "
                    f"uint32 (at most {MAX_SEED}); use a smaller seed")
