"""Token terms of the student's output head with ``impl="fused"``, evaluated together.

A term built with ``impl="fused"`` (``ce``, ``kd``, ``reverse_kl``, ``jsd``, ``tvd``) is a
:class:`FusedHeadTerm`. Alone it is an ordinary term. The objective evaluates all of them (those
reading one teacher) in one :func:`kdlab.losses.fused_head.fused_head_losses` pass: each chunk's
student logits are computed once for CE and the divergences, the step's gradient goes through one
backward of the head, and the student's argmax per token (the train accuracy) comes from the same
chunks, so no ``[B, L, V]`` logits exist in the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from kdlab.errors import UserError
from kdlab.losses import fused_head
from kdlab.objective.terms import common
from kdlab.objective.types import StepInputs


@dataclasses.dataclass(frozen=True)
class FusedHeadTerm:
  """A term's fn (``TermFn``): ``part`` of the student's head, against ``teacher`` (None for ``ce``)."""
  part: fused_head.Part
  teacher: int | str | None
  chunk_size: int | None

  def __call__(self, connector: Any, inputs: StepInputs, state: Any) -> tuple[jax.Array, None]:
    return evaluate([self], inputs, None).combined, None


def evaluate(fns: Sequence[FusedHeadTerm], inputs: StepInputs, coef: jax.Array | None) -> fused_head.HeadLosses:
  """The parts of ``fns`` in one pass (one teacher among them, the first chunk size given)."""
  teachers = {f.teacher for f in fns} - {None}
  if len(teachers) > 1:
    raise ValueError(f"fused terms of one pass read one teacher, got {sorted(map(str, teachers))}")
  s_out = inputs.student
  teacher = {}
  if teachers:
    t_out = common.teacher_output(inputs, teachers.pop())
    teacher = dict(t_hidden=t_out.feats["final"], t_unembed=t_out.unembedding)
  chunk_sizes = [f.chunk_size for f in fns if f.chunk_size is not None]
  targets = inputs.batch["targets"] if any(f.part.kind == fused_head.CE for f in fns) else None
  return fused_head.fused_head_losses(
      s_out.feats["final"], s_out.unembedding, common.token_mask(inputs.batch), [f.part for f in fns], coef=coef,
      targets=targets, weights=common.token_weights(inputs.batch), chunk_size=chunk_sizes[0] if chunk_sizes else None,
      **teacher)


def groups(fns: Sequence[Any]) -> list[list[int]]:
  """Indices of the fused terms among ``fns``, grouped into passes: the ``ce`` terms join the first
  teacher's pass; terms of another teacher make passes of their own."""
  fused = [i for i, fn in enumerate(fns) if isinstance(fn, FusedHeadTerm)]
  first_teacher = next((fns[i].teacher for i in fused if fns[i].teacher is not None), None)
  passes: dict[Any, list[int]] = {}
  for i in fused:
    passes.setdefault(first_teacher if fns[i].teacher is None else fns[i].teacher, []).append(i)
  return list(passes.values())


def check_chunk_sizes(wheres: Sequence[str], fns: Sequence[Any]) -> None:
  """Terms of one pass share its chunks: two different ``chunk_size`` values among them are refused
  (``wheres``: each term's place in the config, for the message)."""
  for group in groups(fns):
    given = {fns[i].chunk_size: wheres[i] for i in group if fns[i].chunk_size is not None}
    if len(given) > 1:
      (a, where_a), (b, where_b) = list(given.items())[:2]
      raise UserError(f"{where_b}: chunk_size={b} but {where_a} has chunk_size={a}; the fused terms of one "
                      f"head share its chunks: give them one chunk_size")
