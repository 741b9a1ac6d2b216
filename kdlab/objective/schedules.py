"""Term weights (and EMA decays) as optax schedules from config values."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from kdlab.errors import UserError


_SCHEDULE_ALIASES = {
    # The short form of docs/design.md: dict(schedule="linear", init=, end=, steps=).
    "linear": ("linear_schedule", {"init": "init_value", "end": "end_value", "steps": "transition_steps"}),
    "constant": ("constant_schedule", {"value": "value"}),
}


def make_schedule(value: Any, field: str) -> Callable[[jax.Array], jax.Array]:
  """A number or an optax schedule description -> ``step -> value``.

  ``dict(schedule="linear", init=0.0, end=1.0, steps=100)`` (short form), or
  any ``optax.schedules`` function by name with its own keyword arguments,
  e.g. ``dict(schedule="cosine_decay", init_value=1.0, decay_steps=1000)``.
  """
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return optax.constant_schedule(float(value))
  if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
    value = value.to_dict()
  if not isinstance(value, Mapping) or "schedule" not in value:
    raise UserError(f"{field}: expected a number or dict(schedule=..., ...), got {value!r}")
  kwargs = dict(value)
  kind = kwargs.pop("schedule")
  if isinstance(kwargs.get("boundaries_and_scales"), Mapping):
    # JSON (a run's config.json) turns the int step boundaries into strings.
    try:
      kwargs["boundaries_and_scales"] = {int(k): float(v) for k, v in kwargs["boundaries_and_scales"].items()}
    except (TypeError, ValueError):
      raise UserError(f"{field}: boundaries_and_scales must map int steps to numbers, "
                      f"got {kwargs['boundaries_and_scales']!r}") from None
  if kind in _SCHEDULE_ALIASES:
    fn_name, renames = _SCHEDULE_ALIASES[kind]
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
  else:
    fn_name = kind if kind.endswith("schedule") else f"{kind}_schedule"
  fn = getattr(optax.schedules, fn_name, None)
  if fn is None:
    raise UserError(f"{field}: unknown schedule {kind!r}; use 'linear', 'constant' or an optax.schedules name")
  try:
    return fn(**kwargs)
  except TypeError as e:
    raise UserError(f"{field}: bad arguments for optax.schedules.{fn_name}: {e}") from None


