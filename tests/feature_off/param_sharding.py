"""Parameter sharding off: the params, their optimizer state and the EMA copy stay replicated,
whatever ``config.sharding_rules`` says (the values are unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_sharded_train.py::test_params_moments_and_ema_are_split_over_model_by_the_rules[saved]",
    "tests/test_sharded_train.py::test_teacher_params_are_split_over_model_by_the_rules",
    "tests/test_fsdp.py::test_params_moments_ema_and_teacher_are_split_over_fsdp_and_model",
    "tests/test_fsdp.py::test_run_saved_on_8_devices_resumes_on_4_resharded_with_the_same_results",
)


def disable() -> None:
  import jax
  from kdlab import mesh

  param_shardings = mesh.param_shardings

  def replicated(module, mesh_, rules, field, rules_field="config.sharding_rules"):
    return jax.tree.map(lambda _: mesh.replicated(mesh_), param_shardings(module, mesh_, rules, field, rules_field))

  mesh.param_shardings = replicated


pytest_configure = plugin(__name__, disable)
