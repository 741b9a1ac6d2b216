"""Logit terms: ``ce``, the logit divergences (kd, reverse_kl, jsd, tvd, dkd, logit_l2, hard_ce),
the ``top_k_agreement`` metric, and ``topk_kd`` from the teacher-output cache."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdlab import losses
from kdlab.errors import UserError
from kdlab.losses import fused_head, sequence
from kdlab.losses.ensembles import METHODS as COMBINE_METHODS
from kdlab.objective.registry import register_term
from kdlab.objective.terms import common, fused
from kdlab.objective.types import CACHE_KEYS, Shapes, StepInputs


@register_term("ce", group="task")
def _ce(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """Cross-entropy with the labels; for token logits with ``batch["targets"]``, per sequence (or
  weighted by ``batch["token_weights"]`` under ``config.train.token_normalization="global"``).
  Token logits also take ``impl="fused"`` (and ``chunk_size``): computed from the student's
  final hidden states and unembedding chunk by chunk (:mod:`kdlab.objective.terms.fused`)."""
  tap = spec.pop("student", "logits")
  token = common.is_token(common.tap_shape(shapes.student, tap, "student"))
  impl, chunk_size = common.token_impl(spec, losses.ce, token, None, tap, "logits", impls=("plain", "fused"))
  hparams = common.hparams(losses.ce, spec)
  if impl == "fused":
    common.check_fused(shapes.student, "student", fallback="impl='plain'")
    return fused.FusedHeadTerm(fused_head.Part(fused_head.CE, **hparams), None, chunk_size), None, None

  def fn(connector: Any, inputs: StepInputs, state: Any):
    loss = losses.ce(inputs.student.tap(tap), common.labels(inputs.batch, token), **hparams)
    if token:
      loss = common.per_sequence(loss, inputs.batch)
    return loss, None

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
    s_shape = common.tap_shape(shapes.student, s_tap, "student")
    token = common.is_token(s_shape)
    group = spec.pop("from_teachers", None)
    impl, chunk_size = common.token_impl(spec, loss_fn, token, group, s_tap, t_tap)
    length_normalize = spec.pop("length_normalize", True)  # on-policy / MiniLLM option (kdlab.train.on_policy)
    if not isinstance(length_normalize, bool) or (not length_normalize and not token):
      raise UserError(f"length_normalize={length_normalize!r}: True (mean over a sequence's tokens) or False (their "
                      f"sum), for token logits [batch, length, vocab] only")
    method, weights = spec.pop("combine", None), spec.pop("combine_weights", None)
    if group is None:
      if method is not None or weights is not None:
        raise UserError("combine=... needs from_teachers=[...] (a list of teachers)")
      teachers = [common.teacher_index(spec, shapes)]
    else:
      if "from_teacher" in spec or not isinstance(group, (list, tuple)) or not group:
        raise UserError("give either from_teacher=NAME or a non-empty list from_teachers=[...], not both")
      if method not in COMBINE_METHODS:
        raise UserError(f"combine={method!r}: choose one of {list(COMBINE_METHODS)}")
      teachers = [common.teacher_index({"from_teacher": ref}, shapes) for ref in group]
    for teacher in teachers:
      t_shape = common.tap_shape(common.teacher_shapes(shapes, teacher), t_tap, "teacher")
      if s_shape.shape != t_shape.shape:
        raise UserError(f"student tap {s_tap!r} {s_shape.shape} and teacher tap {t_tap!r} {t_shape.shape} "
                        f"differ in shape (e.g. the number of classes)")
    if impl == "fused":
      common.check_fused(shapes.student, "student")
      common.check_fused(common.teacher_shapes(shapes, teachers[0]), "teacher")
    hparams = common.hparams(loss_fn, spec)
    temperature = hparams.get("temperature", 1.0)

    def target(inputs: StepInputs) -> jax.Array:
      taps = [common.teacher_output(inputs, t).tap(t_tap) for t in teachers]
      if group is None:
        return taps[0]
      labels = common.labels(inputs.batch, token) if method == "confidence" else None
      return losses.combine_teachers(jnp.stack(taps), method=method, temperature=temperature,
                                     weights=None if weights is None else jnp.asarray(weights), labels=labels)

    def per_sequence(inputs: StepInputs, weights: jax.Array | None) -> jax.Array:
      """``[B]`` (or ``[B, ...]`` for non-token taps): the mean over each sequence's tokens, or the
      sum weighted by ``weights``."""
      mask = common.token_mask(inputs.batch) if token else None
      if impl == "fused":
        s_out, t_out = inputs.student, common.teacher_output(inputs, teachers[0])
        return fused_head.fused_token_kd(s_out.feats["final"], s_out.unembedding, t_out.feats["final"],
                                       t_out.unembedding, mask, divergence=loss_fn.__name__, chunk_size=chunk_size,
                                       weights=weights, **hparams)
      s, t = inputs.student.tap(s_tap), target(inputs)
      if impl == "chunked":
        return sequence.chunked_token_kd(s, t, mask, divergence=loss_fn.__name__, chunk_size=chunk_size,
                                         weights=weights, **hparams)
      if needs_labels:
        loss = loss_fn(s, t, common.labels(inputs.batch, token), **hparams)
      else:
        loss = loss_fn(s, t, **hparams)
      if token:  # Per token -> per sequence.
        loss = sequence.masked_sequence_mean(loss, mask, weights=weights)
      return loss

    def fn(connector: Any, inputs: StepInputs, state: Any):
      return per_sequence(inputs, common.token_weights(inputs.batch) if token else None), None

    if impl == "fused" and length_normalize:
      fn = fused.FusedHeadTerm(fused_head.Part(loss_fn.__name__, **hparams), teachers[0], chunk_size)
    if not length_normalize:
      # The sum over the sequence's tokens (mean x count) instead of their mean; a per-sequence sum
      # whatever config.train.token_normalization (its batch mean already weighs every token alike).
      def fn(connector: Any, inputs: StepInputs, state: Any):
        loss = per_sequence(inputs, None)
        return loss * jnp.sum(common.token_mask(inputs.batch).astype(jnp.float32), axis=-1), None

    return fn, None, None

  return builder


register_term("kd")(logit_pair_term(losses.kd))
register_term("reverse_kl")(logit_pair_term(losses.reverse_kl))
register_term("jsd")(logit_pair_term(losses.jsd))
register_term("tvd")(logit_pair_term(losses.tvd))
register_term("dkd")(logit_pair_term(losses.dkd, needs_labels=True))
register_term("logit_l2")(logit_pair_term(losses.logit_l2))
register_term("hard_ce")(logit_pair_term(losses.hard_ce))
# A metric (no gradient): logged as agreement/<name>; give it weight=0.0.
register_term("top_k_agreement", group="agreement")(logit_pair_term(losses.top_k_agreement))



@register_term("topk_kd")
def _topk_kd(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """KD against the teacher's cached top-k log-probabilities and rest mass (``config.teacher_cache``).

  ``dict(loss="topk_kd", weight=..., temperature=...)``: :func:`kdlab.losses.sequence.topk_kd` of
  the student's ``[B, L, V]`` logits against ``batch["cache/topk_logprobs"]``,
  ``["cache/topk_indices"]`` and ``["cache/rest_logprobs"]`` (merged into every train batch by
  the loop from the cache), over the tokens of ``batch["token_mask"]`` (weighted by
  ``batch["token_weights"]`` under ``config.train.token_normalization="global"``). No teacher runs;
  with ``k = V`` it equals ``kd`` against the live teacher.
  """
  s_tap = spec.pop("student", "logits")
  s_shape = common.tap_shape(shapes.student, s_tap, "student").shape
  if len(s_shape) != 3:
    raise UserError(f"topk_kd needs a language model's [batch, length, vocab] logits; student tap {s_tap!r} "
                    f"is {s_shape}")
  batch = shapes.batch or {}
  if not all(key in batch for key in CACHE_KEYS):
    raise UserError("topk_kd reads the teacher-output cache: set config.teacher_cache to a directory built by "
                    "kdlab cache-teacher (docs/procedures.md)")
  k = batch["cache/topk_logprobs"].shape[-1]
  if k > s_shape[-1]:
    raise UserError(f"the teacher cache keeps k={k} tokens but the student's vocab size is {s_shape[-1]}")
  hparams = common.hparams(sequence.topk_kd, spec, exclude=("rest_logprobs", "weights"))

  def fn(connector: Any, inputs: StepInputs, state: Any):
    b = inputs.batch
    return sequence.topk_kd(inputs.student.tap(s_tap), b["cache/topk_logprobs"], b["cache/topk_indices"],
                            b["token_mask"], rest_logprobs=b["cache/rest_logprobs"],
                            weights=common.token_weights(b), **hparams), None

  return fn, None, None
