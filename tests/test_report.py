"""kdlab report and the sweep tables, on synthetic run directories (no training)."""

import csv
import json
import pathlib
import struct

import numpy as np
import pytest

from kdlab import cli, report, sweep as ksweep

from conftest import HINTON, tree_snapshot

GRID = """
def get_sweep():
  return {"name": "ta", "seeds": [0, 1],
          "grid": {"objective[1].temperature": [1.0, 4.0],
                   ("objective[0].weight", "objective[1].weight"): [(0.9, 0.1), (0.1, 0.9)]},
          "labels": {"objective[1].temperature": "T", "objective[1].weight": "alpha"}}
"""
METHODS = """
def get_sweep():
  return {"name": "methods", "list": [{"objective[1].loss": "kd"}, {"objective[1].loss": "reverse_kl"},
                                      {"objective[1].loss": "jsd"}]}
"""
PNG = b"\x89PNG"


def _fake_run(run_dir: pathlib.Path, accuracy: float, *, finished: bool = True, epochs: int = 4) -> None:
  """A run directory as train() leaves it: metrics.jsonl (train and eval lines), summary.json."""
  run_dir.mkdir(parents=True)
  lines = []
  for e in range(1, epochs + 1):
    lines.append({"step": 10 * e, "epoch": float(e), "loss": 1.0 / e, "task/ce": 0.8 / e, "distill/kd": 0.2 / e})
    lines.append({"step": 10 * e, "epoch": float(e), "test/accuracy": accuracy - 0.1 * (epochs - e) / epochs,
                  "test/errors": 0, "test/ce": 0.1, "agreement/top1": 0.95, "test/kl_teacher": 0.01})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  (run_dir / "config.json").write_text(json.dumps({"seed": 0, "model": {"name": "mlp"}, "data": {"source": "digits"},
                                                   "objective": [{"loss": "ce", "weight": 1.0}]}))
  if finished:
    summary = {"steps": 10 * epochs, "test_accuracy": accuracy, "best_test_accuracy": accuracy + 0.005,
               "test_errors": round((1 - accuracy) * 1000), "test_errors_per_class": [1] * 10,
               "test_examples": 1000, "test_ce": 0.1, "agreement_top1": 0.95, "kl_teacher": 0.01,
               "wall_time_s": 1.0, "steps_per_s": 10.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _fake_sweep(tmp_path: pathlib.Path, body: str, accuracy, skip=()) -> tuple[pathlib.Path, ksweep.Sweep]:
  """A sweep directory (sweep.json + runs) with ``accuracy(run)`` as each run's final test accuracy."""
  file = tmp_path / "sweep_file.py"
  file.write_text(body)
  sweep, _ = ksweep.plan(f"{HINTON}:kd", str(file))
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  (workdir / "sweep.json").write_text(json.dumps(sweep.to_json()))
  for run in sweep.runs():
    _fake_run(workdir / run.name, accuracy(run), finished=run.name not in skip)
  return workdir, sweep


def _acc(run):
  """Accuracy rises with T and falls with alpha; seeds differ by 0.01."""
  v = run.setting.values
  return 0.9 + 0.01 * v["objective[1].temperature"] - 0.05 * v["objective[1].weight"] + 0.01 * run.seed


@pytest.fixture
def drawn(monkeypatch):
  """PNG name -> the matplotlib ``Figure`` saved to it (so a test reads the data a plot draws)."""
  from matplotlib.figure import Figure
  figures, save = {}, Figure.savefig

  def savefig(self, fname, *args, **kwargs):
    save(self, fname, *args, **kwargs)
    figures[pathlib.Path(fname).name] = self
    png = pathlib.Path(fname).read_bytes()  # The file holds this figure: its pixel size.
    size = self.get_size_inches() * kwargs.get("dpi", self.dpi)
    assert png.startswith(PNG) and np.allclose(struct.unpack(">II", png[16:24]), size, atol=1)

  monkeypatch.setattr(Figure, "savefig", savefig)
  return figures


def _finished_accuracies(sweep, accuracy, skip=()):
  """Setting name -> the final accuracies of its finished runs, seed order."""
  return {s.name: [accuracy(r) for r in sweep.runs() if r.setting == s and r.name not in skip] for s in sweep.settings}


def test_grid_report_draws_the_runs_curves_cells_and_errors_and_writes_the_tables(tmp_path, drawn):
  skip = ["objective.1.temperature=4,objective.0.weight=0.1,objective.1.weight=0.9/seed=1"]
  workdir, sweep = _fake_sweep(tmp_path, GRID, _acc, skip)
  assert cli.main(["report", str(workdir)]) == 0
  text = (workdir / "report.md").read_text()
  for png in ("heatmap.png", "comparison.png", "learning_curves.png"):
    assert f"]({png})" in text and (workdir / png).read_bytes().startswith(PNG)
  assert "7 of 8 runs finished" in text
  finals = _finished_accuracies(sweep, _acc, skip)
  epochs = np.arange(1.0, 5.0)

  # Learning curves: a panel per T, a line per alpha: the mean over finished seeds, a min-max band.
  panels = drawn["learning_curves.png"].axes
  assert [ax.get_title() for ax in panels] == ["T = 1", "T = 4"]
  for ax, settings in zip(panels, (sweep.settings[:2], sweep.settings[2:])):
    assert len(ax.lines) == len(settings)
    bands = iter(ax.collections)
    for line, s in zip(ax.lines, settings):
      curves = 100 * np.asarray([[a - 0.1 * (4 - e) / 4 for e in epochs] for a in finals[s.name]])
      alpha = s.values["objective[1].weight"]
      n = len(curves)
      assert line.get_label() == f"alpha = {alpha:g} ({n} seed{'s' if n > 1 else ''})"
      np.testing.assert_allclose(line.get_xdata(), epochs)
      np.testing.assert_allclose(line.get_ydata(), curves.mean(0))
      if n > 1:
        xy = next(bands).get_paths()[0].vertices
        for e, lo, hi in zip(epochs, curves.min(0), curves.max(0)):
          np.testing.assert_allclose(sorted({xy[xy[:, 0] == e, 1].min(), xy[xy[:, 0] == e, 1].max()}), [lo, hi])
    assert next(bands, None) is None  # One band per line with more than one seed.

  # Heatmap: rows T, columns alpha, each cell the mean final accuracy (%) of its finished seeds.
  cells = drawn["heatmap.png"].axes[0].images[0].get_array()
  expected = 100 * np.asarray([[np.mean(finals[s.name]) for s in row] for row in (sweep.settings[:2],
                                                                                   sweep.settings[2:])])
  np.testing.assert_allclose(cells, expected)

  # Comparison: bars of mean test error (%), a dot per finished seed.
  ax = drawn["comparison.png"].axes[0]
  errors = [100 * (1 - np.asarray(finals[s.name])) for s in sweep.settings]
  np.testing.assert_allclose([bar.get_width() for bar in ax.patches], [e.mean() for e in errors])
  dots = [line for line in ax.lines if line.get_marker() == "."]
  assert len(dots) == len(errors)
  for line, e, y in zip(dots, errors, range(len(errors))):
    np.testing.assert_allclose(line.get_xdata(), e)
    assert set(line.get_ydata()) == {y}
  assert "Best by mean last-epoch test accuracy: T = 4, alpha = 0.1 (94.00 +/- 0.71%, 2 seeds)" in text

  md = (workdir / "results.md").read_text()
  rows = [[c.strip() for c in l.strip("|").split("|")] for l in md.splitlines() if l.startswith("| ")]
  # The tied axis (objective[0].weight, objective[1].weight) is one column, shown by its label only.
  assert rows[0] == ["T", "alpha", "last-epoch test acc (%)", "best-epoch test acc (%)",
                     "test errors (of 1000)", "agreement top-1 (%)", "KL(teacher, student)", "seeds"]
  acc = [100 * _acc(r) for r in sweep.runs() if r.setting == sweep.settings[0]]
  assert rows[1][:4] == ["1", "0.1", f"{np.mean(acc):.2f} +/- {np.std(acc, ddof=1):.2f}",
                         f"{np.mean(acc) + 0.5:.2f} +/- {np.std(acc, ddof=1):.2f}"]
  assert rows[3][2] == "**94.00 +/- 0.71**"        # The best setting, in bold.
  assert rows[4][2:] == ["89.50", "90.00", "105.0", "95.00", "0.0100", "1"]  # One seed unfinished: no spread.

  table = list(csv.DictReader((workdir / "results.csv").open()))
  assert len(table) == 8 and [r["finished"] for r in table].count("False") == 1
  assert table[0]["objective[1].temperature"] == "1.0" and table[0]["objective[1].weight"] == "0.1"
  assert table[0]["test_errors_per_class"] == " ".join(["1"] * 10)


def test_list_report_compares_methods_without_a_heatmap(tmp_path, drawn):
  workdir, _ = _fake_sweep(tmp_path, METHODS, lambda run: {"kd": 0.97, "reverse_kl": 0.96, "jsd": 0.95}[
      run.setting.values["objective[1].loss"]])
  text = (report.report(workdir)).read_text()
  assert "heatmap.png" not in text and not (workdir / "heatmap.png").exists()
  assert (workdir / "comparison.png").read_bytes().startswith(PNG)
  ax = drawn["comparison.png"].axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == [f"objective[1].loss={m}" for m in ("kd", "reverse_kl", "jsd")]
  np.testing.assert_allclose([bar.get_width() for bar in ax.patches], [3.0, 4.0, 5.0])
  assert "| objective[1].loss | last-epoch test acc (%) |" in text
  assert "| kd | **97.00** |" in text and "Best by mean last-epoch test accuracy: objective[1].loss = kd" in text


def test_single_run_report_tables_the_summary_and_draws_its_metrics(tmp_path, drawn):
  run = tmp_path / "run"
  _fake_run(run, 0.97)
  assert cli.main(["report", str(run)]) == 0
  text = (run / "report.md").read_text()
  assert "| test_accuracy | 97.00% |" in text and "| test_errors | 30 |" in text
  assert "Model `mlp`, data `digits`, seed 0, objective: 1.0 x ce" in text
  assert "](learning_curves.png)" in text and (run / "learning_curves.png").read_bytes().startswith(PNG)
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  evals, train = [l for l in lines if "test/accuracy" in l], [l for l in lines if "loss" in l]
  acc_ax, loss_ax = drawn["learning_curves.png"].axes
  assert acc_ax.get_ylabel() == "test accuracy (%)"
  line, = acc_ax.lines
  np.testing.assert_allclose(line.get_xdata(), [l["epoch"] for l in evals])
  np.testing.assert_allclose(line.get_ydata(), [100 * l["test/accuracy"] for l in evals])
  assert [l.get_label() for l in loss_ax.lines] == ["loss", "distill/kd", "task/ce"]
  for line in loss_ax.lines:
    np.testing.assert_allclose(line.get_xdata(), [l["epoch"] for l in train])
    np.testing.assert_allclose(line.get_ydata(), [l[line.get_label()] for l in train])

  unfinished = tmp_path / "unfinished"
  _fake_run(unfinished, 0.9, finished=False)
  text = report.report(unfinished).read_text()
  assert "Not finished" in text and (unfinished / "learning_curves.png").exists()


def test_report_on_a_directory_that_is_neither(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  before = tree_snapshot(tmp_path)
  assert cli.main(["report", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "neither a sweep directory (sweep.json) nor a run directory" in err[0]
  assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("values, expected", [([0.5], "50.00"), ([0.5, 0.7], "60.00 +/- 14.14"), ([], "-"),
                                              ([None, None], "-")])
def test_mean_std_shows_one_value_alone_and_skips_missing_ones(values, expected):
  assert ksweep.mean_std(values, "{:.2f}", 100) == expected
