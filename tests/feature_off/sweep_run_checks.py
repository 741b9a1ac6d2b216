"""Sweep run checks off: ``kdlab sweep`` checks each setting with ``prepare`` alone, so a best-checkpoint
metric the run does not log is found only when that run starts, after the sweep has written its workdir."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_validation.py::test_a_sweep_setting_with_an_unknown_best_metric_is_refused_before_any_run",)


def disable() -> None:
  from kdlab import sweep
  from kdlab.errors import UserError

  def check(s, base):
    from kdlab.train.prepare import prepare
    for setting in s.settings:
      try:
        prepare(sweep.run_config(base, s, sweep.Run(setting, s.seeds[0])))
      except UserError as e:
        raise UserError(f"--sweep={s.command['sweep']}: setting {setting.name}: {e}") from None

  sweep.check = check


pytest_configure = plugin(__name__, disable)
