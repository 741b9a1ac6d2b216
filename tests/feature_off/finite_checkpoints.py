"""The check before each save off: a train state holding nan or inf is written as a checkpoint, which then
passes for the last good one."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_faults.py::test_nan_stops_before_a_checkpoint_holds_it_and_a_lower_learning_rate_continues_the_workdir",
)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.train import loop
  loop._finite_per_run = lambda state, n: jnp.ones((n,) if n > 1 else (), bool)


pytest_configure = plugin(__name__, disable)
