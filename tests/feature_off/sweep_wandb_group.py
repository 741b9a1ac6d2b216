"""Sweep W&B group and tags off: a sweep's runs are logged without the sweep's group and tags."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sweep.py::test_sweep_runs_log_to_wandb_in_the_sweep_group_tagged_with_their_values",)


def disable() -> None:
  from kdlab import sweep
  run_config = sweep.run_config

  def ungrouped(base, sw, run):
    config = run_config(base, sw, run)
    config.wandb_group, config.wandb_tags = "", []
    return config

  sweep.run_config = ungrouped


pytest_configure = plugin(__name__, disable)
