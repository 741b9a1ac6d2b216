"""EMA update off: the EMA teacher keeps its initial parameters (decay forced to 1 in the train step)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_procedures.py::test_ema_teacher_equals_hand_rolled_ema",)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.train import loop, step
  make_train_step = step.make_train_step

  def frozen_ema(graphdef, objective, tx, teachers, ema_decay=None, **kwargs):
    frozen = None if ema_decay is None else (lambda s: jnp.ones((), jnp.float32))
    return make_train_step(graphdef, objective, tx, teachers, frozen, **kwargs)

  step.make_train_step = loop.make_train_step = frozen_ema


pytest_configure = plugin(__name__, disable)
