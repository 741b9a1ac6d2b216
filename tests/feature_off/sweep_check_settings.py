"""Sweep set-up check off: settings are not built before the first run, so a setting that train refuses
fails only when its turn comes (after the runs before it were trained)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sweep.py::test_bad_sweep_fails_before_any_run_naming_the_entry[setting_train_refuses]",)


def disable() -> None:
  from kdlab import sweep
  sweep.check = lambda sw, base: None


pytest_configure = plugin(__name__, disable)
