"""optax optimizers and learning-rate schedules from ``config.optimizer``."""

from __future__ import annotations

from typing import Any, Mapping

import optax

from kdlab.errors import UserError


def learning_rate(cfg: Mapping[str, Any], steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """``schedule``: ``constant``, ``cosine``, or ``piecewise`` (x ``decay`` at ``boundaries_epochs``)."""
  lr, kind = float(cfg["learning_rate"]), cfg.get("schedule", "constant")
  warmup = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  elif kind == "piecewise":
    boundaries = {int(e * steps_per_epoch) - warmup: float(cfg.get("decay", 0.1))
                  for e in cfg.get("boundaries_epochs", ())}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise UserError(f"config.optimizer.schedule: unknown schedule {kind!r}; use constant, cosine or piecewise")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make(cfg: Mapping[str, Any], steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  """``config.optimizer`` -> an optax transformation (weight decay coupled, as in PyTorch SGD)."""
  name = cfg.get("name", "sgd")
  lr = learning_rate(cfg, steps_per_epoch, total_steps)
  if float(cfg["learning_rate"]) <= 0:
    raise UserError(f"config.optimizer.learning_rate must be > 0, got {cfg['learning_rate']}")
  wd = float(cfg.get("weight_decay", 0.0))
  if name == "sgd":
    opt = optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None, nesterov=bool(cfg.get("nesterov", False)))
  elif name == "adam":
    opt = optax.adam(lr)
  elif name == "adamw":
    return optax.adamw(lr, weight_decay=wd)
  else:
    raise UserError(f"config.optimizer.name: unknown optimizer {name!r}; use sgd, adam or adamw")
  return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt
