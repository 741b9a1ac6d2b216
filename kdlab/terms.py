"""Builders that turn ``config.objective`` entries into terms (see :mod:`kdlab.objectives`).

Common options of a term spec:
  * ``student`` / ``teacher``: the tap each side reads (``"logits"`` or a ``feats`` key).
  * ``from_teacher``: which teacher (index into ``config.teachers`` or its name; default 0).
Any other key is the loss function's keyword hyperparameter.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax

from kdlab import losses
from kdlab.errors import UserError
from kdlab.objectives import Shapes, StepInputs, register_term


def _teacher_index(spec: dict[str, Any], shapes: Shapes) -> int:
  ref = spec.pop("from_teacher", 0)
  if not shapes.teachers:
    raise UserError("this term needs a teacher but config.teachers is empty")
  if isinstance(ref, str):
    if ref not in shapes.teacher_names:
      raise UserError(f"from_teacher={ref!r} names no teacher; teachers are {list(shapes.teacher_names)}")
    return list(shapes.teacher_names).index(ref)
  if not 0 <= ref < len(shapes.teachers):
    raise UserError(f"from_teacher={ref} is out of range; there are {len(shapes.teachers)} teachers")
  return ref


def _tap_shape(output: Any, tap: str, side: str) -> Any:
  if tap != "logits" and tap not in output.feats:
    raise UserError(f"{side}={tap!r} is not a tap of the {side} model; taps are "
                    f"{['logits', *sorted(output.feats)]}")
  return output.tap(tap)


def _hparams(fn: Callable[..., Any], spec: dict[str, Any], exclude: tuple[str, ...] = ("where",)) -> dict[str, Any]:
  """Pops ``fn``'s keyword-only hyperparameters out of ``spec``; leftovers are an error."""
  params = inspect.signature(fn).parameters
  allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in exclude}
  unknown = sorted(set(spec) - allowed)
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for loss {fn.__name__}; allowed: {sorted(allowed)}")
  return {n: spec.pop(n) for n in list(spec)}


@register_term("ce", group="task")
def _ce(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  tap = spec.pop("student", "logits")
  _tap_shape(shapes.student, tap, "student")
  hparams = _hparams(losses.ce, spec)

  def fn(connector: Any, inputs: StepInputs, state: Any):
    return losses.ce(inputs.student.tap(tap), inputs.batch["label"], **hparams), None

  return fn, None, None


def logit_pair_term(loss_fn: Callable[..., jax.Array], *, needs_labels: bool = False):
  """Builder for a loss ``loss_fn(s, t, [labels], **hparams)`` between two same-shaped taps."""

  def builder(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
    teacher = _teacher_index(spec, shapes)
    s_tap, t_tap = spec.pop("student", "logits"), spec.pop("teacher", "logits")
    s_shape = _tap_shape(shapes.student, s_tap, "student")
    t_shape = _tap_shape(shapes.teachers[teacher], t_tap, "teacher")
    if s_shape.shape != t_shape.shape:
      raise UserError(f"student tap {s_tap!r} {s_shape.shape} and teacher tap {t_tap!r} {t_shape.shape} "
                      f"differ in shape (e.g. the number of classes)")
    hparams = _hparams(loss_fn, spec)

    def fn(connector: Any, inputs: StepInputs, state: Any):
      s, t = inputs.student.tap(s_tap), inputs.teachers[teacher].tap(t_tap)
      if needs_labels:
        return loss_fn(s, t, inputs.batch["label"], **hparams), None
      return loss_fn(s, t, **hparams), None

    return fn, None, None

  return builder


register_term("kd")(logit_pair_term(losses.kd))
