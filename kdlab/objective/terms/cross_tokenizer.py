"""Cross-tokenizer terms: ``uld`` and ``aligned_kd`` (teacher and student with different vocabularies).

``dict(loss="uld", weight=W, temperature=T)`` is :func:`kdlab.losses.cross_tokenizer.uld`;
``dict(loss="aligned_kd", weight=W, temperature=T)`` is :func:`kdlab.losses.cross_tokenizer.aligned_kd`
(chunk likelihood matching). Both take ``from_teacher`` (default 0; not ``"self"``, whose
tokenization is the student's) and compare the student's ``[B, L_s, V_s]`` logits with the
teacher's ``[B, L_t, V_t]`` logits of the same text tokenized the teacher's way.

Batch contract (what the data pipeline and the train step must provide; one example's arrays come
from :func:`kdlab.data.alignment.align`, batches stack them):

| key | dtype, shape | meaning | read by |
|---|---|---|---|
| ``tokens`` | int32 ``[B, L_s]`` | the student's inputs | the student |
| ``targets`` | int32 ``[B, L_s]`` | the student's next tokens | ``aligned_kd`` |
| ``token_mask`` | float32 ``[B, L_s]`` | 1 on the completion's targets | ``uld`` |
| ``student_chunks`` | int32 ``[B, L_s]`` | chunk id of each student target, -1 outside | ``aligned_kd`` |
| ``teacher_tokens`` | int32 ``[B, L_t]`` | the teacher's inputs (its own tokenization) | the teacher |
| ``teacher_targets`` | int32 ``[B, L_t]`` | the teacher's next tokens | ``aligned_kd`` |
| ``teacher_token_mask`` | float32 ``[B, L_t]`` | 1 on the teacher's completion targets | ``uld`` |
| ``teacher_chunks`` | int32 ``[B, L_t]`` | chunk id of each teacher target (the student's ids) | ``aligned_kd`` |
| ``token_weights`` | float32 ``[B, L_s]`` | optional: global per-token normalization | both |

The teacher's logits (``inputs.teachers[i].logits``) must be its forward pass on
``batch["teacher_tokens"]``: the train step runs a cross-tokenizer teacher on that key instead of
``tokens``; the builder checks that their lengths agree. With ``token_weights`` present the
per-sequence means are replaced by ``sum_l token_weights_bl * value_bl`` over student positions
(the module doc of :mod:`kdlab.losses.cross_tokenizer` defines each position's value).
"""

from __future__ import annotations

from typing import Any

from kdlab.errors import UserError
from kdlab.losses import cross_tokenizer as xtok
from kdlab.objective.registry import register_term
from kdlab.objective.terms import common
from kdlab.objective.types import Shapes, StepInputs

ULD_KEYS = ("token_mask", "teacher_tokens", "teacher_token_mask")
ALIGNED_KEYS = ("targets", "student_chunks", "teacher_tokens", "teacher_targets", "teacher_chunks")


def _setup(name: str, spec: dict[str, Any], shapes: Shapes, keys: tuple[str, ...]) -> int:
  """Checks the models' logits and the batch keys; returns the teacher's index."""
  if spec.get("from_teacher") == "self":
    raise UserError(f"{name} compares two tokenizations; from_teacher='self' has only the student's")
  teacher = common.teacher_index(spec, shapes)
  s_shape, t_shape = shapes.student.logits.shape, shapes.teachers[teacher].logits.shape
  for side, shape in (("student", s_shape), ("teacher", t_shape)):
    if len(shape) != 3:
      raise UserError(f"{name} needs language models' [batch, length, vocab] logits; the {side}'s are {shape}")
  batch = shapes.batch or {}
  missing = [key for key in keys if key not in batch]
  if missing:
    raise UserError(f"{name} reads batch keys {missing}: the teacher's own tokenization of each example "
                    f"(cross-tokenizer data, kdlab.data.alignment.align); this batch has {sorted(batch)}")
  lt = batch["teacher_tokens"].shape[1]
  if t_shape[1] != lt:
    raise UserError(f"{name}: the teacher's logits cover {t_shape[1]} positions but batch['teacher_tokens'] has "
                    f"{lt}; the teacher must run on batch['teacher_tokens']")
  return teacher


@register_term("uld")
def _uld(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """ULD: W1 between sorted probability vectors, the i-th completion tokens of both sides paired."""
  teacher = _setup("uld", spec, shapes, ULD_KEYS)
  hparams = common.hparams(xtok.uld, spec, exclude=("weights",))

  def fn(connector: Any, inputs: StepInputs, state: Any):
    b = inputs.batch
    return xtok.uld(inputs.student.logits, inputs.teachers[teacher].logits, b["token_mask"],
                    b["teacher_token_mask"], weights=b.get("token_weights"), **hparams), None

  return fn, None, None


@register_term("aligned_kd")
def _aligned_kd(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """Chunk likelihood matching: binary KL of each aligned chunk's teacher-forced probability."""
  teacher = _setup("aligned_kd", spec, shapes, ALIGNED_KEYS)
  hparams = common.hparams(xtok.aligned_kd, spec, exclude=("weights",))

  def fn(connector: Any, inputs: StepInputs, state: Any):
    b = inputs.batch
    return xtok.aligned_kd(inputs.student.logits, b["targets"], b["student_chunks"],
                           inputs.teachers[teacher].logits, b["teacher_targets"], b["teacher_chunks"],
                           weights=b.get("token_weights"), **hparams), None

  return fn, None, None
