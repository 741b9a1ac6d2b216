"""Default sharding rules off: with no ``config.sharding_rules`` a mesh with ``fsdp`` / ``model``
axes leaves every parameter replicated (as before the sharding issue)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_fsdp.py::test_params_moments_ema_and_teacher_are_split_over_fsdp_and_model",)


def disable() -> None:
  from kdlab import mesh
  mesh.DEFAULT_RULES = ()


pytest_configure = plugin(__name__, disable)
