"""Sweep run order off: runs go setting-major (every seed of a setting, then the next setting)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sweep.py::test_tied_paths_are_one_grid_axis_set_together_in_seed_major_runs",)


def disable() -> None:
  from kdlab import sweep
  sweep.Sweep.runs = lambda self: [sweep.Run(s, seed) for s in self.settings for seed in self.seeds]


pytest_configure = plugin(__name__, disable)
