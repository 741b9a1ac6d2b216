"""Born-sharded state off: the learner and its optimizer state are built whole on the default device,
then placed on the mesh (every device briefly needs a full copy)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_fsdp.py::test_the_learner_is_built_inside_the_sharded_jit",)


def disable() -> None:
  import jax
  from kdlab.train import state

  def create_state(make_learner, tx, term_states, seed, *, ema, mesh, param_shardings):
    graphdef, full = state.init_state(make_learner(), tx, dict(term_states), seed, ema=ema)
    return graphdef, jax.device_put(full, state.state_shardings(full, mesh, param_shardings))

  state.create_state = create_state
  from kdlab.train import evaluate, loop
  loop.create_state = evaluate.create_state = create_state


pytest_configure = plugin(__name__, disable)
