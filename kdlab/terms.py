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
import jax.numpy as jnp

from kdlab import losses
from kdlab.errors import UserError
from kdlab.losses.ensembles import METHODS as COMBINE_METHODS
from kdlab.objectives import Shapes, StepInputs, register_term


def _teacher_index(spec: dict[str, Any], shapes: Shapes) -> int | str:
  """Resolves ``from_teacher``: an index or name in ``config.teachers``, or ``"self"``.

  ``"self"`` makes the student its own (stop-gradient) teacher, e.g. a deep
  exit teaching a shallow one; ``"ema"`` is the EMA teacher when
  ``config.ema_teacher`` is set.
  """
  ref = spec.pop("from_teacher", 0)
  if ref == "self":
    return "self"
  if not shapes.teachers:
    raise UserError("this term needs a teacher but config.teachers is empty (or use from_teacher='self')")
  if isinstance(ref, str):
    if ref not in shapes.teacher_names:
      raise UserError(f"from_teacher={ref!r} names no teacher; teachers are {list(shapes.teacher_names)}")
    return list(shapes.teacher_names).index(ref)
  if not isinstance(ref, int) or not 0 <= ref < len(shapes.teachers):
    raise UserError(f"from_teacher={ref!r} is out of range; there are {len(shapes.teachers)} teachers")
  return ref


def _teacher_output(inputs: StepInputs, teacher: int | str) -> Any:
  return jax.lax.stop_gradient(inputs.student) if teacher == "self" else inputs.teachers[teacher]


def _teacher_shapes(shapes: Shapes, teacher: int | str) -> Any:
  return shapes.student if teacher == "self" else shapes.teachers[teacher]


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
  """Builder for ``loss_fn(s, t, [labels], **hparams)`` between two same-shaped taps.

  Besides ``from_teacher``, a spec may name several teachers,
  ``from_teachers=["t0", "t1"]`` with ``combine="mean_probs" | "mean_logits" |
  "weighted" | "confidence"`` (and ``combine_weights=[...]`` for "weighted"):
  the target is :func:`kdlab.losses.combine_teachers` of their taps at the
  term's temperature.
  """

  def builder(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
    s_tap, t_tap = spec.pop("student", "logits"), spec.pop("teacher", "logits")
    s_shape = _tap_shape(shapes.student, s_tap, "student")
    group = spec.pop("from_teachers", None)
    method, weights = spec.pop("combine", None), spec.pop("combine_weights", None)
    if group is None:
      if method is not None or weights is not None:
        raise UserError("combine=... needs from_teachers=[...] (a list of teachers)")
      teachers = [_teacher_index(spec, shapes)]
    else:
      if "from_teacher" in spec or not isinstance(group, (list, tuple)) or not group:
        raise UserError("give either from_teacher=NAME or a non-empty list from_teachers=[...], not both")
      if method not in COMBINE_METHODS:
        raise UserError(f"combine={method!r}: choose one of {list(COMBINE_METHODS)}")
      teachers = [_teacher_index({"from_teacher": ref}, shapes) for ref in group]
    for teacher in teachers:
      t_shape = _tap_shape(_teacher_shapes(shapes, teacher), t_tap, "teacher")
      if s_shape.shape != t_shape.shape:
        raise UserError(f"student tap {s_tap!r} {s_shape.shape} and teacher tap {t_tap!r} {t_shape.shape} "
                        f"differ in shape (e.g. the number of classes)")
    hparams = _hparams(loss_fn, spec)
    temperature = hparams.get("temperature", 1.0)

    def target(inputs: StepInputs) -> jax.Array:
      taps = [_teacher_output(inputs, t).tap(t_tap) for t in teachers]
      if group is None:
        return taps[0]
      labels = inputs.batch["label"] if method == "confidence" else None
      return losses.combine_teachers(jnp.stack(taps), method=method, temperature=temperature,
                                     weights=None if weights is None else jnp.asarray(weights), labels=labels)

    def fn(connector: Any, inputs: StepInputs, state: Any):
      s, t = inputs.student.tap(s_tap), target(inputs)
      if needs_labels:
        return loss_fn(s, t, inputs.batch["label"], **hparams), None
      return loss_fn(s, t, **hparams), None

    return fn, None, None

  return builder


register_term("kd")(logit_pair_term(losses.kd))
