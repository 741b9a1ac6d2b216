"""``build(config.objective, shapes, rngs) -> Objective``: the weighted, scheduled sum of terms."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.errors import UserError
from kdlab.objective import registry
from kdlab.objective.schedules import make_schedule
from kdlab.objective.terms import fused
from kdlab.objective.types import Shapes, StepInputs, Term, TermFn


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
    out = self.evaluate(connectors, inputs, states)
    return out.total, out.metrics, out.states

  def term_losses(self, connectors: Mapping[str, Any], inputs: StepInputs, states: Mapping[str, Any]
                  ) -> tuple[dict[str, jax.Array], dict[str, tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """As ``__call__`` but with each term's weighted loss by name (they sum to the total).

    The train step differentiates them separately for the ``grad_norm/<term>`` metrics.
    """
    out = self.evaluate(connectors, inputs, states, per_term=True)
    return out.losses, out.metrics, out.states

  def evaluate(self, connectors: Mapping[str, Any], inputs: StepInputs, states: Mapping[str, Any], *,
               per_term: bool = False) -> Evaluation:
    """The terms on one step's inputs (see :class:`Evaluation`).

    The ``impl="fused"`` token terms of the student's head are evaluated in one pass
    (:mod:`kdlab.objective.terms.fused`), unless ``per_term`` (each term's loss on its own, to be
    differentiated separately).
    """
    mask = inputs.batch["mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    losses: dict[str, jax.Array] = {}
    metrics: dict[str, tuple[jax.Array, jax.Array]] = {}
    new_states = dict(states)

    def record(term: Term, per_example: jax.Array, weight: jax.Array) -> jax.Array:
      loss_sum = jnp.sum(per_example * mask)
      metrics[f"{term.group}/{term.name}"] = (loss_sum, count)
      metrics[f"weight/{term.name}"] = (weight, jnp.ones((), jnp.float32))
      return weight * loss_sum / jnp.maximum(count, 1.0)

    passes = [] if per_term else fused.groups([t.fn for t in self.terms])
    in_pass = {i for group in passes for i in group}
    keys = jax.random.split(inputs.key, max(len(self.terms), 1))
    for i, (term, key) in enumerate(zip(self.terms, keys)):
      if i in in_pass:
        continue
      per_example, state = term.fn(connectors.get(term.name), dataclasses.replace(inputs, key=key),
                                   states.get(term.name))
      if state is not None:
        new_states[term.name] = state
      # Token-level terms return [B, L]; reduce extra axes per example first.
      per_example = per_example.reshape(per_example.shape[0], -1).mean(axis=1)
      losses[term.name] = record(term, per_example, term.weight(inputs.step))
    predictions = None
    for group in passes:
      terms = [self.terms[i] for i in group]
      weights = jnp.stack([jnp.asarray(t.weight(inputs.step), jnp.float32) for t in terms])
      out = fused.evaluate([t.fn for t in terms], inputs, weights)
      for k, term in enumerate(terms):
        record(term, out.per_part[k], weights[k])  # logged; the gradient flows through out.combined
      losses["+".join(t.name for t in terms)] = jnp.sum(out.combined * mask) / jnp.maximum(count, 1.0)
      predictions = out.predictions if predictions is None else predictions
    total = jnp.zeros((), jnp.float32)
    for value in losses.values():
      total = total + value
    metrics["loss"] = (total * count, count)
    return Evaluation(total, losses, metrics, new_states, predictions)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of the objective.

  Attributes:
    total: the loss (a scalar).
    losses: weighted losses summing to ``total``: one per term, or per fused pass (named
      ``"ce+kd"``, its terms joined by ``+``).
    metrics: ``(sum, count)`` pairs: ``<group>/<term>``, ``weight/<term>``, ``loss``.
    states: the new term states.
    predictions: ``[B, L]`` the student's argmax tokens, when a fused pass computed them (no
      ``[B, L, V]`` logits exist then), else None.
  """
  total: jax.Array
  losses: dict[str, jax.Array]
  metrics: dict[str, tuple[jax.Array, jax.Array]]
  states: dict[str, Any]
  predictions: jax.Array | None


def build(specs: Sequence[Mapping[str, Any]], shapes: Shapes, rngs: nnx.Rngs) -> Objective:
  """Builds the objective of ``config.objective``; bad specs raise :class:`UserError` naming the term."""
  if not specs:
    raise UserError("config.objective is empty; add at least one term, e.g. dict(loss='ce', weight=1.0)")
  terms, wheres, seen = [], [], set()
  for i, spec in enumerate(specs):
    spec = dict(spec)
    where = f"config.objective[{i}]"
    loss = spec.pop("loss", None)
    if loss not in registry.term_names():
      raise UserError(f"{where}: unknown loss {loss!r}; choose one of {', '.join(registry.term_names())}")
    name = spec.pop("name", loss)
    if name in seen:
      raise UserError(f"{where}: two terms are named {name!r}; give one a distinct name=...")
    seen.add(name)
    weight = make_schedule(spec.pop("weight", 1.0), f"{where}.weight")
    builder, group = registry.lookup(loss)
    where = f"{where} ({name})"
    try:
      fn, connector, state = builder(spec, shapes=shapes, rngs=rngs)
      _check_traces(fn, connector, state, shapes)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
      raise UserError(f"{where}: {e}") from None
    terms.append(Term(name, group, weight, fn, connector, state))
    wheres.append(where)
  fused.check_chunk_sizes(wheres, [t.fn for t in terms])
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
