"""vmap_seeds off: every seed of a vmapped group starts from the first seed's initial state."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_vmap_seeds.py::test_vmapped_seeds_equal_separate_runs",
)


def disable() -> None:
  from kdlab.train import loop
  stack = loop._stack
  loop._stack = lambda trees: stack([trees[0]] * len(trees))


pytest_configure = plugin(__name__, disable)
