"""Sliced loading off: ``from_pretrained`` with a mesh reads every tensor whole and then places it
(each device would need the full tensor in host memory)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_pretrained_models.py::test_sharded_load_on_eight_devices",)


def disable() -> None:
  import jax
  from kdlab.models import pretrained

  def whole_then_placed(shape, sharding, read):
    return jax.device_put(read(tuple(slice(None) for _ in shape)), sharding)

  pretrained._sharded_array = whole_then_placed


pytest_configure = plugin(__name__, disable)
