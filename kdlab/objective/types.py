"""The objective's types: what models return, what a term reads, a built term, the shapes builders see."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx

# The batch keys the teacher-output cache adds to every train batch (config.teacher_cache).
CACHE_KEYS = ("cache/topk_logprobs", "cache/topk_indices", "cache/rest_logprobs")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
  """What a model returned: ``logits [B, C]`` (or ``[B, L, V]``) and named ``feats``.

  ``unembedding`` is the model's ``[D, V]`` output matrix for models that have one
  (``logits = feats["final"] @ unembedding``, e.g. ``gpt``), else None; fused token
  distillation (``impl="fused"``) reads it instead of the logits.
  """
  logits: jax.Array
  feats: Mapping[str, jax.Array]
  unembedding: jax.Array | None = None

  def tap(self, name: str) -> jax.Array:
    return self.logits if name == "logits" else self.feats[name]


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """Everything a term may read in one step.

  Attributes:
    student: the student's outputs.
    teachers: each teacher's outputs (already under ``stop_gradient``).
    batch: the batch (images: ``label``, ``index``, ``mask``; text: ``targets``, ``token_mask``,
      ``index``, ``mask``; see :mod:`kdlab.data.pipeline`).
    step: the optimizer step (scalar int).
    key: a PRNG key for stochastic terms (e.g. CRD negatives).
  """
  student: ModelOutput
  teachers: Sequence[ModelOutput]
  batch: Mapping[str, jax.Array]
  step: jax.Array
  key: jax.Array


# A term's loss: (connector, inputs, state) -> (per-example loss [B], new state).
TermFn = Callable[[Any, StepInputs, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Term:
  """One built term.

  Attributes:
    name: unique name; metrics are logged as ``<group>/<name>``.
    group: metric namespace: ``task`` (supervised) or ``distill``.
    weight: ``step -> weight`` (an optax schedule or a constant).
    fn: the loss (see ``TermFn``).
    connector: learnable adapter trained with the student, or None.
    state: initial state of a stateful loss (a pytree), or None.
  """
  name: str
  group: str
  weight: Callable[[jax.Array], jax.Array]
  fn: TermFn
  connector: nnx.Module | None = None
  state: Any = None


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Abstract (``jax.ShapeDtypeStruct``) outputs of the models, seen by term builders.

  ``batch`` is the abstract train batch (every key a term may read); None means an
  image-classification batch (``label``, ``index``, ``mask``) of the student's batch size.
  """
  student: ModelOutput
  teachers: Sequence[ModelOutput]
  teacher_names: Sequence[str]
  num_examples: int
  batch: Mapping[str, Any] | None = None


# Builder: (spec without "loss"/"weight"/"name", shapes, rngs, where) -> (fn, connector, state).
Builder = Callable[..., tuple[TermFn, nnx.Module | None, Any]]
