"""``make demo``: paper_repro/hinton2015/run.py's results.md and learning-curve PNG, in its --quick mode.

The runner trains the teacher, then per seed the hard-label student, the distilled student and the
distilled student without 3s (evaluated as is and with the bias of class 3 raised by 3.5). Every
number of results.md is checked against the runs' own files, and the PNG through the data it draws.
"""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

from kdlab.data import load as load_source
from kdlab.train.evaluate import evaluate_run

from conftest import ROOT, read_jsonl, tree_snapshot

SEEDS = 1  # One seed keeps the fixture at four quick runs; the table states mean +/- std all the same.


def _runner():
  spec = importlib.util.spec_from_file_location("hinton2015_run", ROOT / "paper_repro" / "hinton2015" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The runner's outputs on digits, --quick, and the figure it saved."""
  from matplotlib.figure import Figure
  root = tmp_path_factory.mktemp("demo")
  args = ["--source", "digits", "--seeds", str(SEEDS), "--quick", f"--workdir={root / 'runs'}",
          f"--out={root / 'results.md'}"]
  saved, save = [], Figure.savefig

  def savefig(self, fname, *rest, **options):
    saved.append((self, fname))
    save(self, fname, *rest, **options)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Figure, "savefig", savefig)
    assert _runner().main(args) == 0
  runs = root / "runs" / "digits_quick"
  return dict(root=root, runs=runs, args=args, figures=saved, text=(root / "results.md").read_text())


def _summary(run_dir: pathlib.Path) -> dict:
  return json.loads((run_dir / "summary.json").read_text())


def _mean_std(values) -> str:
  """As the results tables write it: one value alone (no spread), else mean +/- sample std."""
  values = np.asarray(values, float)
  return f"{values[0]:.1f}" if len(values) == 1 else f"{values.mean():.1f} +/- {values.std(ddof=1):.1f}"


def _rows(text: str) -> dict[str, list[str]]:
  return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                            for line in text.splitlines() if line.startswith("| "))}


def test_demo_results_table_holds_the_runs_errors(demo):
  runs, rows = demo["runs"], _rows(demo["text"])
  n_test = len(load_source("digits", "test"))
  teacher = _summary(runs / "teacher")
  assert rows["teacher 2x1200, dropout + jitter (1 run)"] == [
      "67", "0.67%", str(teacher["test_errors"]), f"{100 * teacher['test_errors'] / n_test:.2f}%"]
  for name, label in (("student", "student 2x800, hard labels"), ("kd", "student 2x800, distilled at T=20"),
                      ("kd_omit3", "distilled, no 3s in transfer set")):
    errors = [_summary(runs / f"{name}_seed{s}")["test_errors"] for s in range(SEEDS)]
    assert rows[f"{label} ({SEEDS} seeds)"][2] == _mean_std(errors), name
  errors = {name: np.mean([_summary(runs / f"{name}_seed{s}")["test_errors"] for s in range(SEEDS)])
            for name in ("student", "kd")}
  verdict = "fewer" if errors["kd"] < errors["student"] else "NOT fewer"
  assert (f"Over {SEEDS} seeds the distilled student makes {verdict} test errors than the hard-label student "
          f"({errors['kd']:.1f} vs {errors['student']:.1f} on average).") in demo["text"]
  assert f"--source digits --seeds {SEEDS} --quick`" in demo["text"]


def test_demo_omit3_runs_drop_the_3s_and_the_bias_run_raises_class_3_by_3_5(demo):
  runs, rows = demo["runs"], _rows(demo["text"])
  threes = int(np.sum(load_source("digits", "test").labels() == 3))
  plain, biased = [], []
  offset = np.zeros(10, np.float32)
  offset[3] = 3.5
  for s in range(SEEDS):
    config = json.loads((runs / f"kd_omit3_seed{s}" / "config.json").read_text())
    assert config["data"]["exclude_labels"] == [3] and config["seed"] == s
    assert config["teachers"][0]["init"] == str(runs / "teacher" / "checkpoints")
    summary = _summary(runs / f"kd_omit3_seed{s}")
    plain.append({"test/errors": summary["test_errors"], "test/errors_per_class": summary["test_errors_per_class"]})
    biased.append(evaluate_run(runs / f"kd_omit3_seed{s}", logit_offset=offset))
  for p, b in zip(plain, biased):
    # Raising one logit only turns predictions into 3s: fewer errors on the 3s, none fewer on the rest.
    assert b["test/errors_per_class"][3] <= p["test/errors_per_class"][3]
    assert b["test/errors"] - b["test/errors_per_class"][3] >= p["test/errors"] - p["test/errors_per_class"][3]
  assert sum(b["test/errors_per_class"][3] for b in biased) < sum(p["test/errors_per_class"][3] for p in plain)
  assert rows[f"same, bias of 3 raised by 3.5 ({SEEDS} seeds)"][2] == _mean_std([b["test/errors"] for b in biased])
  assert rows["distilled, no 3s in transfer set: errors on the 3s"][2] == (
      f"{_mean_std([p['test/errors_per_class'][3] for p in plain])} of {threes}")
  assert rows["same, bias of 3 raised by 3.5: errors on the 3s"][2] == (
      f"{_mean_std([b['test/errors_per_class'][3] for b in biased])} of {threes}")


def test_demo_learning_curve_png_draws_the_runs_test_errors(demo):
  runs = demo["runs"]
  png = demo["root"] / "learning_curves_digits.png"
  assert "![learning curves](learning_curves_digits.png)" in demo["text"] and png.read_bytes()[:4] == b"\x89PNG"
  (figure, fname), = demo["figures"]
  assert pathlib.Path(fname) == png
  ax, = figure.axes
  assert ax.get_ylabel() == "test error (%)" and [l.get_label() for l in ax.lines] == ["teacher", "student", "kd"]
  for line in ax.lines:
    name = line.get_label()
    dirs = [runs / "teacher"] if name == "teacher" else [runs / f"{name}_seed{s}" for s in range(SEEDS)]
    evals = [[l for l in read_jsonl(d / "metrics.jsonl") if "test/accuracy" in l] for d in dirs]
    assert len(evals[0]) >= 2  # --quick evaluates every half epoch: a curve, not a point.
    np.testing.assert_allclose(line.get_xdata(), [l["epoch"] for l in evals[0]])
    errors = [[100 * (1 - l["test/accuracy"]) for l in e] for e in evals]
    np.testing.assert_allclose(line.get_ydata(), np.mean(errors, 0))


def test_demo_rerun_reuses_the_finished_runs(demo, capsys):
  before = tree_snapshot(demo["runs"])
  out = demo["root"] / "again.md"
  assert _runner().main([*demo["args"][:-1], f"--out={out}"]) == 0
  assert tree_snapshot(demo["runs"]) == before  # No run trained again, no file rewritten.
  strip = lambda text: re.sub(r"this machine: \d+ s", "", text)
  assert strip(out.read_text()) == strip(demo["text"])


def test_make_demo_runs_this_runner_on_mnist5k():
  makefile = (ROOT / "Makefile").read_text()
  recipe = makefile[makefile.index("\ndemo:"):].splitlines()[2]
  assert recipe.split()[1:] == ["paper_repro/hinton2015/run.py", "--source", "mnist5k", "--workdir", "runs/hinton2015"]
