"""Objectives: a weighted, scheduled sum of loss terms declared in config.

``config.objective`` is a list of term specs::

    [dict(loss="ce", weight=0.1),
     dict(loss="kd", weight=0.9, temperature=4.0),
     dict(loss="fitnet", weight=dict(schedule="linear", init=0.0, end=100.0, steps=2000),
          student="stage2", teacher="stage2")]

Each spec is turned into a :class:`Term` by the builder registered for its
``loss`` name (see :mod:`kdlab.terms`). Builders see the shapes of every
model output, so unknown taps, incompatible shapes and bad hyperparameters fail
at start-up with a message naming the term. Learnable connectors (e.g. a
FitNet regressor) are built by the term and trained with the student.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdlab.errors import UserError


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
_BUILDERS: dict[str, tuple[Builder, str]] = {}


def register_term(name: str, *, group: str = "distill") -> Callable[[Builder], Builder]:
  """Registers a term builder under loss name ``name``."""

  def wrap(builder: Builder) -> Builder:
    _BUILDERS[name] = (builder, group)
    return builder

  return wrap


def term_names() -> list[str]:
  import kdlab.terms  # noqa: F401  (registers the built-in terms)
  return sorted(_BUILDERS)


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


class Objective:
  """A weighted sum of terms: ``objective(connectors, inputs, states) -> (loss, metrics, states)``."""

  def __init__(self, terms: Sequence[Term]):
    self.terms = tuple(terms)

  def connectors(self) -> dict[str, nnx.Module]:
    """The learnable connectors by term name (trained with the student)."""
    return {t.name: t.connector for t in self.terms if t.connector is not None}

  def init_state(self) -> dict[str, Any]:
    """Initial states of the stateful terms by term name."""
    return {t.name: t.state for t in self.terms if t.state is not None}

  def __call__(self, connectors: Mapping[str, Any], inputs: StepInputs,
               states: Mapping[str, Any]) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """Total loss, metrics as (sum, count) pairs, and the new term states.

    Each term's per-example loss is averaged over ``batch["mask"]``, weighted by
    its schedule at ``inputs.step``, and summed.
    """
    weighted, metrics, new_states = self.term_losses(connectors, inputs, states)
    total = jnp.zeros((), jnp.float32)
    for value in weighted.values():
      total = total + value
    return total, metrics, new_states

  def term_losses(self, connectors: Mapping[str, Any], inputs: StepInputs, states: Mapping[str, Any]
                  ) -> tuple[dict[str, jax.Array], dict[str, tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """As ``__call__`` but with each term's weighted loss by name (they sum to the total).

    The train step differentiates them separately for the ``grad_norm/<term>`` metrics.
    """
    mask = inputs.batch["mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    total = jnp.zeros((), jnp.float32)
    weighted: dict[str, jax.Array] = {}
    metrics: dict[str, tuple[jax.Array, jax.Array]] = {}
    new_states = dict(states)
    keys = jax.random.split(inputs.key, max(len(self.terms), 1))
    for term, key in zip(self.terms, keys):
      per_example, state = term.fn(connectors.get(term.name), dataclasses.replace(inputs, key=key),
                                   states.get(term.name))
      if state is not None:
        new_states[term.name] = state
      # Token-level terms return [B, L]; reduce extra axes per example first.
      per_example = per_example.reshape(per_example.shape[0], -1).mean(axis=1)
      loss_sum = jnp.sum(per_example * mask)
      weight = term.weight(inputs.step)
      weighted[term.name] = weight * loss_sum / jnp.maximum(count, 1.0)
      total = total + weighted[term.name]
      metrics[f"{term.group}/{term.name}"] = (loss_sum, count)
      metrics[f"weight/{term.name}"] = (weight, jnp.ones((), jnp.float32))
    metrics["loss"] = (total * count, count)
    return weighted, metrics, new_states


def build(specs: Sequence[Mapping[str, Any]], shapes: Shapes, rngs: nnx.Rngs) -> Objective:
  """Builds the objective of ``config.objective``; bad specs raise :class:`UserError` naming the term."""
  import kdlab.terms  # noqa: F401  (registers the built-in terms)
  if not specs:
    raise UserError("config.objective is empty; add at least one term, e.g. dict(loss='ce', weight=1.0)")
  terms, seen = [], set()
  for i, spec in enumerate(specs):
    spec = dict(spec)
    where = f"config.objective[{i}]"
    loss = spec.pop("loss", None)
    if loss not in _BUILDERS:
      raise UserError(f"{where}: unknown loss {loss!r}; choose one of {', '.join(term_names())}")
    name = spec.pop("name", loss)
    if name in seen:
      raise UserError(f"{where}: two terms are named {name!r}; give one a distinct name=...")
    seen.add(name)
    weight = make_schedule(spec.pop("weight", 1.0), f"{where}.weight")
    builder, group = _BUILDERS[loss]
    where = f"{where} ({name})"
    try:
      fn, connector, state = builder(spec, shapes=shapes, rngs=rngs)
      _check_traces(fn, connector, state, shapes)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
      raise UserError(f"{where}: {e}") from None
    terms.append(Term(name, group, weight, fn, connector, state))
  return Objective(terms)


def _check_traces(fn: TermFn, connector: Any, state: Any, shapes: Shapes) -> None:
  """Runs the term once on abstract inputs so shape and hyperparameter errors surface at start-up.

  The connector goes in split (``nnx.split``) and is merged inside the trace, so a call that
  updates its batch statistics touches a throwaway copy, never the real module.
  """
  batch_size = shapes.student.logits.shape[0]
  batch = dict(shapes.batch) if shapes.batch is not None else {
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
  graphdef, variables = nnx.split(connector) if connector is not None else (None, None)

  def run(student, teachers, batch, state, variables):
    module = None if graphdef is None else nnx.merge(graphdef, variables)
    inputs = StepInputs(student, teachers, batch, jnp.zeros((), jnp.int32), jax.random.key(0))
    return fn(module, inputs, state)

  out, _ = jax.eval_shape(run, shapes.student, list(shapes.teachers), batch, state, variables)
  if out.ndim < 1 or out.shape[0] != batch_size:
    raise ValueError(f"the loss returned shape {out.shape}; expected per-example values [{batch_size}, ...]")
