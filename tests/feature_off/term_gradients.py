"""Term gradients off: every objective term's value goes through ``stop_gradient`` (values unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = tuple(f"tests/test_terms.py::test_term_gradient_is_the_weighted_standalone_loss_gradient[{name}]"
               for name in ("tvd", "logit_l2", "rkd_angle", "sp", "attention_kl", "crd"))


def disable() -> None:
  import jax
  from kdlab.objective import registry

  def stopped(builder):
    def build(spec, **kwargs):
      fn, connector, state = builder(spec, **kwargs)

      def stopped_fn(conn, inputs, state):
        loss, new_state = fn(conn, inputs, state)
        return jax.lax.stop_gradient(loss), new_state

      return stopped_fn, connector, state

    return build

  for name, (builder, group) in list(registry._BUILDERS.items()):
    registry._BUILDERS[name] = (stopped(builder), group)


pytest_configure = plugin(__name__, disable)
