"""Best checkpoint off: an evaluation never counts as a new best, so nothing is kept as the best."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_fsdp.py::test_keep_and_best_checkpoint",)


def disable() -> None:
  from kdlab.train import loop
  loop._improves = lambda value, best, mode: False


pytest_configure = plugin(__name__, disable)
