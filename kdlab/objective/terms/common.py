"""Helpers every built-in term builder shares: teachers, taps, hyperparameters, token masks."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from kdlab.errors import UserError
from kdlab.losses import sequence
from kdlab.objective.types import Shapes, StepInputs


def teacher_index(spec: dict[str, Any], shapes: Shapes) -> int | str:
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


def teacher_output(inputs: StepInputs, teacher: int | str) -> Any:
  return jax.lax.stop_gradient(inputs.student) if teacher == "self" else inputs.teachers[teacher]


def teacher_shapes(shapes: Shapes, teacher: int | str) -> Any:
  return shapes.student if teacher == "self" else shapes.teachers[teacher]


def float32(x: jax.Array) -> jax.Array:
  """A floating tap upcast to float32, so that whatever a term computes from a bfloat16 model's
  features (pooling, connectors, the loss) runs in float32; other dtypes pass through (the loss
  then rejects them by name)."""
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def tap_shape(output: Any, tap: str, side: str) -> Any:
  if tap != "logits" and tap not in output.feats:
    raise UserError(f"{side}={tap!r} is not a tap of the {side} model; taps are "
                    f"{['logits', *sorted(output.feats)]}")
  return output.tap(tap)


def hparams(fn: Callable[..., Any], spec: dict[str, Any], exclude: tuple[str, ...] = ("where",)) -> dict[str, Any]:
  """Pops ``fn``'s keyword-only hyperparameters out of ``spec``; leftovers are an error."""
  params = inspect.signature(fn).parameters
  allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in exclude}
  unknown = sorted(set(spec) - allowed)
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for loss {fn.__name__}; allowed: {sorted(allowed)}")
  return {n: spec.pop(n) for n in list(spec)}


IMPLS = ("plain", "chunked", "fused")


def is_token(shape: Any) -> bool:
  """Whether a tap holds token logits ``[B, L, V]`` (a language model's)."""
  return len(shape.shape) == 3


def token_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """``[B, L]`` real-target mask of a text batch."""
  if "token_mask" not in batch:
    raise UserError("token logits [batch, length, vocab] need text batches (a text data source such as "
                    "pysrc, whose batches carry targets and token_mask)")
  return batch["token_mask"]


def token_weights(batch: Mapping[str, jax.Array]) -> jax.Array | None:
  """``[B, L]`` per-token weights ``token_mask * B / N`` when the train step normalizes per token over
  the global batch (``config.train.token_normalization="global"``), else None (per-sequence means)."""
  return batch.get("token_weights")


def per_sequence(per_token: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """``[B, L]`` per-token losses -> ``[B]``: the mean over each sequence's ``token_mask``, or the sum
  weighted by ``batch["token_weights"]`` when the step set them."""
  return sequence.masked_sequence_mean(per_token, token_mask(batch), weights=token_weights(batch))


def rescale_query_mean(per_example: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """A ``[B]`` mean over each sequence's query positions with ``token_mask > 0`` as the global
  per-token form ``sum_l token_weights * loss``: times ``sum_l token_weights`` (the count of the
  row's tokens times ``B / N``, for a 0/1 ``token_mask``); unchanged without ``token_weights``."""
  weights = token_weights(batch)
  if weights is None:
    return per_example
  return per_example * jnp.sum(jnp.asarray(weights, jnp.float32), axis=-1)


def labels(batch: Mapping[str, jax.Array], token: bool) -> jax.Array:
  return batch["targets"] if token else batch["label"]


def token_impl(spec: dict[str, Any], loss_fn: Callable[..., jax.Array], token: bool, group: Any,
               s_tap: str, t_tap: str, impls: tuple[str, ...] = IMPLS) -> tuple[str, int | None]:
  """Pops and checks ``impl`` (one of ``impls``) and ``chunk_size`` (token-level losses)."""
  impl = spec.pop("impl", "plain")
  chunk_size = positive_int(spec, "chunk_size", None)
  if impl not in impls:
    raise UserError(f"impl={impl!r}: unknown; choose one of {', '.join(impls)}")
  if impl == "plain":
    if chunk_size is not None:
      raise UserError("chunk_size applies to impl='chunked' or impl='fused'")
    return impl, None
  if not token:
    raise UserError(f"impl={impl!r} applies to token logits [batch, length, vocab] (language models); "
                    f"use impl='plain' here")
  if loss_fn.__name__ not in (*sequence.DIVERGENCES, "ce"):
    raise UserError(f"impl={impl!r}: only {', '.join(sequence.DIVERGENCES)} have chunked and fused forms")
  if group is not None:
    raise UserError(f"impl={impl!r} distils from one teacher (from_teacher); use impl='plain' with from_teachers")
  if impl == "fused" and (s_tap, t_tap) != ("logits", "logits"):
    raise UserError("impl='fused' computes the logits from feats['final']; it takes student='logits' and "
                    "teacher='logits'")
  return impl, chunk_size


def check_fused(output: Any, side: str, fallback: str = "impl='chunked'") -> None:
  if output.unembedding is None or "final" not in output.feats:
    raise UserError(f"impl='fused' needs the {side} model's unembedding and feats['final'] (e.g. a gpt model); "
                    f"use {fallback}")


def positive_int(spec: dict[str, Any], key: str, default: int | None) -> int | None:
  value = spec.pop(key, default)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise UserError(f"{key} must be an int, got {value!r}")
  if value <= 0:
    raise UserError(f"{key} must be > 0, got {value}")
  return value
