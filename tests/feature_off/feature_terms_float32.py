"""float32 taps off in the feature terms: a bfloat16 model's features are pooled (and fed to connectors)
in bfloat16; only the loss itself upcasts."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_feature_precision.py::test_feature_terms_upcast_before_pooling_and_connectors",)


def disable() -> None:
  from kdlab.objective.terms import common
  common.float32 = lambda x: x


pytest_configure = plugin(__name__, disable)
