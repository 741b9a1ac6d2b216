"""The learner (student + connectors) and the train state pytree."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdlab import mesh as meshlib


class Learner(nnx.Module):
  """Everything that is trained: the student and the objective's connectors."""

  def __init__(self, student: nnx.Module, connectors: Mapping[str, nnx.Module]):
    self.student = student
    self.connectors = nnx.Dict(dict(connectors))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """The whole training state, a pytree of arrays (checkpointed as is).

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: the learner's ``nnx.Param`` values as a pure dict.
    rest: the learner's other variables (batch statistics, RNG streams) as a pure dict.
    opt_state: the optax state of ``params``.
    term_states: states of stateful loss terms by term name (e.g. CRD memory banks).
    key: PRNG key (raw uint32 data) for stochastic loss terms.
    ema: exponential moving average of ``params`` (the EMA teacher), or ``{}``.
  """
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  term_states: Any
  key: jax.Array
  ema: Any = dataclasses.field(default_factory=dict)


def split_learner(learner: Learner) -> tuple[nnx.GraphDef, Any, Any]:
  graphdef, params, rest = nnx.split(learner, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(learner: Learner, tx: optax.GradientTransformation, term_states: Mapping[str, Any],
               seed: int, *, ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, rest = split_learner(learner)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                     term_states=dict(term_states),
                     key=jax.random.key_data(jax.random.key(seed + 1_000_003)),
                     ema=jax.tree.map(jnp.copy, params) if ema else {})
  return graphdef, state


def state_layout(make_learner: Callable[[], Learner], tx: optax.GradientTransformation,
                 term_states: Mapping[str, Any], seed: int, *, ema: bool, mesh: jax.sharding.Mesh,
                 param_shardings: Any) -> tuple[nnx.GraphDef, TrainState, TrainState, Callable[..., TrainState]]:
  """The learner's graph, the initial train state as ``jax.ShapeDtypeStruct`` (nothing allocated),
  its shardings (:func:`state_shardings`) and ``build(term_states) -> TrainState`` making it."""
  graphdef = split_learner(nnx.eval_shape(make_learner))[0]

  def build(term_states: Mapping[str, Any]) -> TrainState:
    return init_state(make_learner(), tx, term_states, seed, ema=ema)[1]

  abstract = jax.eval_shape(build, dict(term_states))
  shardings = state_shardings(abstract, mesh, param_shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, shardings, build


def create_state(make_learner: Callable[[], Learner], tx: optax.GradientTransformation,
                 term_states: Mapping[str, Any], seed: int, *, ema: bool, mesh: jax.sharding.Mesh,
                 param_shardings: Any) -> tuple[nnx.GraphDef, TrainState]:
  """The initial train state, born in its shardings (:func:`state_shardings`).

  ``make_learner()`` builds the learner; it runs inside one jitted function whose outputs are
  laid out by ``param_shardings``, so each device computes only its own slice of every parameter,
  moment and EMA copy (nothing is materialized whole on one device). ``term_states`` (e.g. CRD's
  memory bank) are passed in as they are.
  """
  graphdef, _, shardings, build = state_layout(make_learner, tx, term_states, seed, ema=ema, mesh=mesh,
                                               param_shardings=param_shardings)
  return graphdef, jax.jit(build, out_shardings=shardings)(dict(term_states))


def keys_to_data(tree: Any) -> Any:
  """Typed PRNG key leaves -> raw uint32 data (what orbax can store)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_to_keys(tree: Any, like: Any) -> Any:
  """Inverse of :func:`keys_to_data`, guided by ``like`` (a tree with typed keys)."""
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
                      if _is_key(ref) else x, tree, like)


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh, param_shardings: Any, seeds: int = 1) -> TrainState:
  """Where each array of ``state`` lives: the params, their optimizer state and the EMA copy as
  ``param_shardings`` says (``config.sharding_rules``), the rest replicated; with ``seeds > 1`` for
  the stacked state (a leading, unsplit seed axis)."""
  rep = meshlib.replicated(mesh)
  shardings = TrainState(
      step=rep, params=param_shardings, rest=jax.tree.map(lambda _: rep, state.rest),
      opt_state=meshlib.follow_params(state.opt_state, state.params, param_shardings, rep),
      term_states=jax.tree.map(lambda _: rep, state.term_states), key=rep,
      ema=param_shardings if state.ema else jax.tree.map(lambda _: rep, state.ema))
  if seeds == 1:
    return shardings
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.P(None, *s.spec)), shardings)
