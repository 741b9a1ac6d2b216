"""LM sweep report plots off: a language-model sweep's report plots test accuracy (none) instead of
validation loss."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sweep.py::test_lm_sweep_report_plots_validation_loss_of_the_finished_runs",)


def disable() -> None:
  from kdlab import report
  curves, comparison = report.plot_learning_curves, report.plot_comparison
  report.plot_learning_curves = lambda workdir, sweep, out, lm=False: curves(workdir, sweep, out)
  report.plot_comparison = lambda workdir, sweep, out, lm=False: comparison(workdir, sweep, out)


pytest_configure = plugin(__name__, disable)
