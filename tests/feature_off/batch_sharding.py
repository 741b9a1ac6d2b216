"""Batch sharding off: every device gets the whole batch (replicated) instead of its slice of the
data axes (the values and the losses are unchanged)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sharded_train.py::test_the_batch_is_split_over_the_data_axis",)


def disable() -> None:
  from kdlab import mesh

  mesh.batch_sharding = lambda mesh_, leading_axes=0: mesh.replicated(mesh_)


pytest_configure = plugin(__name__, disable)
