"""Report heatmap off: each cell shows its first seed's accuracy instead of the mean over seeds."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_report.py::test_grid_report_draws_the_runs_curves_cells_and_errors_and_writes_the_tables",
)


def disable() -> None:
  from kdlab import report
  cell_stats = report._cell_stats

  def first_seed_only(workdir, sweep):
    stats = cell_stats(workdir, sweep)
    return {name: {**row, "test_accuracy": row["test_accuracy"][:1]} for name, row in stats.items()}

  report._cell_stats = first_seed_only


pytest_configure = plugin(__name__, disable)
