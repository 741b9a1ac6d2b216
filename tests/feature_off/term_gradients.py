"""Term gradients off: every objective term's value goes through ``stop_gradient`` (values unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = tuple(f"tests/test_terms.py::test_term_gradient_is_the_weighted_standalone_loss_gradient[{name}]"
               for name in ("tvd", "logit_l2", "rkd_angle", "sp", "attention_kl", "crd"))


def disable() -> None:
  import jax
  from kdlab import objectives, terms  # noqa: F401  (terms registers the builders)

  def stopped(builder):
    def build(spec, **kwargs):
      fn, connector, state = builder(spec, **kwargs)

      def stopped_fn(conn, inputs, state):
        loss, new_state = fn(conn, inputs, state)
        return jax.lax.stop_gradient(loss), new_state

      return stopped_fn, connector, state

    return build

  for name, (builder, group) in list(objectives._BUILDERS.items()):
    objectives._BUILDERS[name] = (stopped(builder), group)


pytest_configure = plugin(__name__, disable)
