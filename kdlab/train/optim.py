"""optax optimizers and learning-rate schedules from ``config.optimizer``.

Fields:
  * ``name``: any optax optimizer function (``sgd``, ``adam``, ``adamw``, ``lion``, ``lamb``,
    ``adafactor``, ``adabelief``, ...), called with the schedule as its ``learning_rate``.
  * ``learning_rate``, ``schedule`` (``constant`` / ``cosine`` / ``piecewise`` with
    ``boundaries_epochs`` and ``decay``), ``warmup_epochs``: see :func:`learning_rate`.
  * ``weight_decay`` (default 0): passed as the optimizer's own ``weight_decay`` (decoupled:
    adamw, lion, lamb, lars, adan, ...) or ``weight_decay_rate`` (adafactor) where it has one;
    otherwise (sgd, adam, adabelief, ...) added to the gradient before the optimizer (coupled,
    as in PyTorch SGD).
  * ``momentum`` (default 0.9; 0 or None: none) and ``nesterov``: sgd's; other optimizers ignore
    them (give theirs in ``kwargs``).
  * ``kwargs``: further keyword arguments of the optimizer, e.g. ``dict(b1=0.9, b2=0.95)``.
  * ``clip_grad_norm`` (None: no clipping): the gradients (student and connectors together) are
    scaled down to this global L2 norm before the optimizer (and before coupled weight decay).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from kdlab.config import show
from kdlab.errors import UserError

# Optimizer keywords with a fixed valid range, checked at start-up (the rest only by type).
_UNIT_INTERVAL = ("b1", "b2", "b3", "decay", "rho", "momentum", "decay_rate", "beta")
_NON_NEGATIVE = ("eps", "eps_root")
# Keywords set by config.optimizer's own fields, not through kwargs.
_OWN_FIELDS = {"learning_rate": "learning_rate", "weight_decay": "weight_decay",
               "weight_decay_rate": "weight_decay"}
_SGD_FIELDS = ("momentum", "nesterov")


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
    raise UserError(f"config.optimizer.schedule: unknown schedule {show(kind)}; use constant, cosine or piecewise")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make(cfg: Mapping[str, Any], steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  """``config.optimizer`` -> an optax transformation (see the module docstring for the fields).

  Bad fields raise :class:`UserError` naming ``config.optimizer.<field>``. The optimizer is tried
  once on a small abstract tree (``jax.eval_shape``), so one that cannot run in the train step
  (e.g. ``lbfgs``, which needs the loss function) fails here.
  """
  name = cfg.get("name", "sgd")
  fn = _optimizer_fn(name)
  params = inspect.signature(fn).parameters
  if not _real(cfg.get("learning_rate")) or not 0 < cfg["learning_rate"] < math.inf:
    raise UserError(f"config.optimizer.learning_rate must be > 0, got {show(cfg.get('learning_rate'))}; "
                    f"use e.g. 0.1 (sgd) or 1e-3 (adam)")
  _check_schedule_fields(cfg)
  lr = learning_rate(cfg, steps_per_epoch, total_steps)
  wd = cfg.get("weight_decay", 0.0)
  if not _real(wd) or not 0 <= wd < math.inf:
    raise UserError(f"config.optimizer.weight_decay must be a number >= 0, got {show(wd)}; use e.g. 5e-4 (0: none)")
  wd = float(wd)
  kwargs = _kwargs(cfg.get("kwargs"), name, params)
  clip = _clip(cfg.get("clip_grad_norm"))

  coupled_decay = False
  _check_sgd_fields(cfg)
  try:
    if name == "sgd":
      opt = optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None, nesterov=bool(cfg.get("nesterov", False)),
                      **kwargs)
      coupled_decay = bool(wd)
    elif "weight_decay" in params:
      opt = fn(lr, weight_decay=wd, **kwargs)
    elif "weight_decay_rate" in params:  # adafactor: None (its default) skips the decay step.
      opt = fn(lr, weight_decay_rate=wd or None, **kwargs)
    else:
      opt = fn(lr, **kwargs)
      coupled_decay = bool(wd)
  except (TypeError, ValueError) as e:
    raise UserError(f"config.optimizer.{'kwargs' if kwargs else 'name'}: optax.{name} refused its arguments "
                    f"({_first_line(e)}); {_fix(bool(kwargs))}") from None
  if not isinstance(opt, optax.GradientTransformation):
    raise UserError(f"config.optimizer.name: optax.{name}(...) returned {type(opt).__name__}, not an optax "
                    f"GradientTransformation; use an optimizer such as adam, adamw, sgd or lion")
  chain = [optax.clip_by_global_norm(clip)] if clip is not None else []
  if coupled_decay:
    chain.append(optax.add_decayed_weights(wd))
  tx = optax.chain(*chain, opt) if chain else opt
  _check_runs(tx, name, bool(kwargs))
  return tx


def _real(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value


def _check_schedule_fields(cfg: Mapping[str, Any]) -> None:
  """``warmup_epochs`` >= 0; ``decay`` > 0 and ``boundaries_epochs`` numbers >= 0 (``piecewise``)."""
  warmup = cfg.get("warmup_epochs", 0)
  if not _real(warmup) or warmup < 0:
    raise UserError(f"config.optimizer.warmup_epochs={show(warmup)}: must be a number >= 0 (epochs of linear warm-up); "
                    f"use e.g. 0.0")
  decay = cfg.get("decay", 0.1)
  if not _real(decay) or decay <= 0:
    raise UserError(f"config.optimizer.decay={show(decay)}: must be a number > 0 (the piecewise schedule's factor at "
                    f"each boundary); use e.g. 0.1")
  boundaries = cfg.get("boundaries_epochs", ())
  if not isinstance(boundaries, (list, tuple)) or not all(_real(b) and b >= 0 for b in boundaries):
    raise UserError(f"config.optimizer.boundaries_epochs={show(boundaries)}: must be a list of epochs >= 0 (where the "
                    f"piecewise schedule decays); use e.g. [30, 60]")


def _check_sgd_fields(cfg: Mapping[str, Any]) -> None:
  """sgd's ``momentum`` (None: none) in [0, 1) and ``nesterov`` a bool (checked whatever the optimizer)."""
  momentum = cfg.get("momentum", 0.9)
  if momentum is not None and (not _real(momentum) or not 0 <= momentum < 1):
    raise UserError(f"config.optimizer.momentum={show(momentum)}: must be a number in [0, 1) (0 or None: plain SGD); "
                    f"use e.g. 0.9")
  nesterov = cfg.get("nesterov", False)
  if not isinstance(nesterov, bool):
    raise UserError(f"config.optimizer.nesterov={show(nesterov)}: use True or False")


def _optimizer_fn(name: Any) -> Callable[..., Any]:
  """``optax.<name>`` if it is an optimizer function (it takes a ``learning_rate``)."""
  fix = "use an optax optimizer name such as sgd, adam, adamw, lion, lamb, adafactor or adabelief"
  if not isinstance(name, str) or name.startswith("_"):
    raise UserError(f"config.optimizer.name: {name!r} is not an optax optimizer name; {fix}")
  fn = getattr(optax, name, None)
  if fn is None:
    raise UserError(f"config.optimizer.name: optax has no optimizer {name!r}; {fix}")
  try:
    params = inspect.signature(fn).parameters if callable(fn) and not inspect.isclass(fn) else {}
  except (TypeError, ValueError):
    params = {}
  if "learning_rate" not in params:
    raise UserError(f"config.optimizer.name: optax.{name} is not an optimizer (it takes no learning_rate); {fix}")
  return fn


def _kwargs(raw: Any, name: str, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
  """``config.optimizer.kwargs``, checked against ``optax.<name>``'s signature."""
  if raw is None:
    return {}
  if hasattr(raw, "to_dict"):  # an ml_collections.ConfigDict
    raw = raw.to_dict()
  if not isinstance(raw, Mapping):
    raise UserError(f"config.optimizer.kwargs must be a dict of optax.{name}'s keyword arguments, got {show(raw)}")
  kwargs = dict(raw)
  accepted = [p for p in params if p not in _OWN_FIELDS]
  for key, value in kwargs.items():
    field = f"config.optimizer.kwargs.{key}"
    if key in _OWN_FIELDS:
      raise UserError(f"{field}: set it as config.optimizer.{_OWN_FIELDS[key]} instead")
    if name == "sgd" and key in _SGD_FIELDS:
      raise UserError(f"{field}: set sgd's {key} as config.optimizer.{key} instead")
    if key not in params:
      raise UserError(f"{field}: optax.{name} takes no argument {key!r}; it takes {', '.join(accepted)}")
    default = params[key].default
    if isinstance(default, bool) and not isinstance(value, bool):
      raise UserError(f"{field}={show(value)}: expected True or False")
    if isinstance(default, numbers.Real) and not isinstance(default, bool) \
        and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
      raise UserError(f"{field}={show(value)}: expected a number like the default {default!r}")
    if key in _UNIT_INTERVAL and isinstance(value, numbers.Real) and not 0 <= value < 1:
      raise UserError(f"{field}={show(value)}: must be in [0, 1)")
    if key in _NON_NEGATIVE and isinstance(value, numbers.Real) and value < 0:
      raise UserError(f"{field}={show(value)}: must be >= 0")
  return kwargs


def _clip(value: Any) -> float | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise UserError(f"config.optimizer.clip_grad_norm={show(value)}: use a number > 0 (the largest global gradient "
                    f"L2 norm) or None for no clipping")
  return float(value)


def _check_runs(tx: optax.GradientTransformation, name: str, has_kwargs: bool) -> None:
  """Runs ``tx.init`` and one ``tx.update`` abstractly on a small float32 tree."""
  field = "kwargs" if has_kwargs else "name"
  tree = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}

  def one_update(params):
    return tx.update(params, tx.init(params), params)

  try:
    jax.eval_shape(one_update, tree)
  except Exception as e:  # noqa: BLE001  (any failure here is a bad optimizer setting)
    raise UserError(f"config.optimizer.{field}: optax.{name} fails on a trial update ({_first_line(e)}); "
                    f"{_fix(has_kwargs)}") from None


def _fix(has_kwargs: bool) -> str:
  if has_kwargs:
    return "fix config.optimizer.kwargs"
  return ("use another optimizer (kdlab passes it a learning-rate schedule and the gradients only; "
          "e.g. lbfgs needs the loss function)")


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
