"""Logical axis names off for the CIFAR zoo and the MLP: their parameters carry no names (replicated)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_model_axes.py::test_every_zoo_model_is_named",
          "tests/test_model_axes.py::test_named_parameters_keep_their_values[mlp]",
          "tests/test_model_axes.py::test_created_sharded_under_a_mesh")


def disable() -> None:
  from flax import nnx
  from kdlab.models import layers, mlp
  layers._names = lambda axes: {}
  mlp._linear = lambda a, b, axes, rngs: nnx.Linear(a, b, rngs=rngs)


pytest_configure = plugin(__name__, disable)
