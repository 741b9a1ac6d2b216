"""kdlab sweep: sweep files, validation before any run, kill -9 and resume, results.csv / results.md."""

import csv
import json
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

from kdlab import cli, report, sweep as ksweep
from kdlab.errors import UserError

from conftest import HINTON, child_env, kdlab_cmd, read_jsonl, run_child, tree_snapshot

STUDENT = f"{HINTON}:student,source=digits,quick"
TINY = """
def get_sweep():
  return {"name": "tiny", "seeds": [0, 1], "grid": {"optimizer.learning_rate": [0.01, 0.003]}}
"""
RUNS = [f"optimizer.learning_rate={lr}/seed={s}" for s in (0, 1) for lr in ("0.01", "0.003")]
TIMING = ("wall_time_s", "steps_per_s")


def _sweep_file(tmp_path: pathlib.Path, body: str, name: str = "sweep.py") -> str:
  path = tmp_path / name
  path.write_text(body)
  return str(path)


def _sweep_args(sweep_file: str, workdir: pathlib.Path, *extra: str) -> list[str]:
  return kdlab_cmd("sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}", "--nowandb",
                   *extra)


def _finished(workdir: pathlib.Path) -> list[str]:
  return sorted(str(p.parent.relative_to(workdir)) for p in workdir.rglob("summary.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny sweep (2 learning rates x 2 seeds) run without interruption, in this process."""
  root = tmp_path_factory.mktemp("sweep")
  sweep_file = _sweep_file(root, TINY)
  assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={root / 'full'}",
                   "--nowandb"]) == 0
  return sweep_file, root / "full"


def test_killed_sweep_resumes_to_the_same_runs_and_numbers(uninterrupted, tmp_path):
  """SIGKILL a sequential ``kdlab sweep`` after its first run, restart it with --parallel 2."""
  sweep_file, full = uninterrupted
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_sweep_args(sweep_file, killed), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

  def partial_run_with_checkpoint():
    return any(not (c.parent / "summary.json").exists() and any(p.name.isdigit() for p in c.iterdir())
               for c in killed.glob("*/seed=*/checkpoints"))

  # Kill -9 once the first run has finished and, ideally, the next one has saved a checkpoint.
  deadline = time.time() + 180
  while time.time() < deadline and not _finished(killed):
    time.sleep(0.02)
  second = time.time() + 20
  while time.time() < second and not partial_run_with_checkpoint() and len(_finished(killed)) < 2:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _finished(killed)
  assert 1 <= len(done) < len(RUNS) and not (killed / "results.csv").exists(), done
  stamps = {r: (killed / r / "summary.json").stat().st_mtime_ns for r in done}

  # Restarted with two worker processes: the same runs and numbers as one uninterrupted process.
  out = run_child(_sweep_args(sweep_file, killed, "--parallel", "2")).stdout
  assert f"{len(done)} finished earlier; 2 workers" in out
  assert _finished(killed) == _finished(full) == sorted(RUNS)
  assert {r: (killed / r / "summary.json").stat().st_mtime_ns for r in done} == stamps  # Skipped, not redone.
  for run in RUNS:
    a, b = (json.loads((d / run / "summary.json").read_text()) for d in (full, killed))
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}, run
    la, lb = read_jsonl(full / run / "metrics.jsonl"), read_jsonl(killed / run / "metrics.jsonl")
    assert [l["step"] for l in la] == [l["step"] for l in lb]
    np.testing.assert_allclose([l.get("loss", 0.0) for l in lb], [l.get("loss", 0.0) for l in la], rtol=1e-6)

  def rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader((workdir / "results.csv").open())]

  assert rows(killed) == rows(full)
  assert (killed / "results.md").read_text() == (full / "results.md").read_text().replace(str(full), str(killed))


def test_results_csv_and_md(uninterrupted):
  _, full = uninterrupted
  rows = list(csv.DictReader((full / "results.csv").open()))
  assert [r["run"] for r in rows] == RUNS
  assert {"setting", "optimizer.learning_rate", "seed", "finished", "test_accuracy", "best_test_accuracy",
          "test_errors", "test_examples", "agreement_top1", "kl_teacher", "wall_time_s"} <= set(rows[0])
  assert all(r["finished"] == "True" and r["test_examples"] == "359" for r in rows)
  md = (full / "results.md").read_text()
  assert "last-epoch test acc (%)" in md and "best-epoch test acc (%)" in md and "4 of 4 runs finished" in md
  table = [l for l in md.splitlines() if l.startswith("| 0.0")]
  assert len(table) == 2
  for line, lr in zip(table, ("0.01", "0.003")):
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    acc = [100 * float(r["test_accuracy"]) for r in rows if r["optimizer.learning_rate"] == lr]
    errors = [int(r["test_errors"]) for r in rows if r["optimizer.learning_rate"] == lr]
    assert cells[0] == lr and cells[-1] == "2"
    assert cells[1] == f"{np.mean(acc):.2f} +/- {np.std(acc, ddof=1):.2f}"
    assert cells[3] == f"{np.mean(errors):.1f} +/- {np.std(errors, ddof=1):.1f}"
    assert cells[4] == cells[5] == "-"  # No teacher: no agreement, no KL.


def test_report_on_the_sweep_and_on_one_run(uninterrupted):
  _, full = uninterrupted
  assert cli.main(["report", str(full)]) == 0
  text = (full / "report.md").read_text()
  for png in ("comparison.png", "learning_curves.png"):
    assert f"]({png})" in text and (full / png).read_bytes().startswith(b"\x89PNG")
  assert "heatmap.png" not in text  # One swept axis: no heatmap.
  run = full / RUNS[0]
  report.report(run)
  assert "| test_accuracy |" in (run / "report.md").read_text()
  assert (run / "learning_curves.png").read_bytes().startswith(b"\x89PNG")


# Validation: every mistake is one line naming the entry, before anything is written.

@pytest.mark.parametrize("body, extra, message", [
    ('{"grid": {"optimizer.learning_rat": [0.1]}}', (),
     "grid['optimizer.learning_rat']: optimizer.learning_rat=0.1: unknown config field config.optimizer.learning_rat"),
    ('{"list": [{"model.hidden": (8, 8)}, {"model.hiden": (8, 8)}]}', (),
     "list[1]['model.hiden']: model.hiden=(8, 8): unknown config field config.model.hiden"),
    ('{"grid": {"objective[3].weight": [0.1]}}', (), "grid['objective[3].weight']: objective[3].weight=0.1: "
     "config.objective[3] does not exist"),
    ('{"grid": {"train.num_epochs": [1.0, "two"]}}', (), "grid['train.num_epochs']: train.num_epochs='two': "
     "expected a value of type float"),
    ('{"random": {"num_samples": 2, "space": {"optimizer.learing_rate": ("loguniform", 1e-3, 1e-1)}}}', (),
     "random.space['optimizer.learing_rate']"),
    ('{"grid": {}}', (), "grid is empty"),
    ('{"grid": {"optimizer.learning_rate": []}}', (), "grid['optimizer.learning_rate']: no values"),
    ('{"list": []}', (), "list is empty"),
    ('{"grid": {"optimizer.learning_rate": [0.1, 0.01]}}', ("--config.optimizer.learning_rate=0.5",),
     "grid['optimizer.learning_rate']: conflicting overrides, optimizer.learning_rate is also set on the command "
     "line by --config.optimizer.learning_rate"),
    ('{"list": [{"train.num_epochs": 1.0}, {"optimizer": {"name": "sgd"}, "optimizer.learning_rate": 0.1}]}', (),
     "list[1]['optimizer.learning_rate']: conflicting overrides, optimizer.learning_rate is set twice in list[1]"),
    ('{"grid": {"optimizer.learning_rate": [0.1], ("train.num_epochs", "optimizer.learning_rate"): [(1.0, 0.2)]}}',
     (), "grid[('train.num_epochs', 'optimizer.learning_rate')]: conflicting overrides, optimizer.learning_rate is "
     "also set by grid['optimizer.learning_rate']"),
    ('{"grid": {("train.num_epochs", "optimizer.learning_rate"): [(1.0, 0.2, 3)]}}', (),
     "grid[('train.num_epochs', 'optimizer.learning_rate')][0]: expected a tuple of 2 values"),
    ('{"grid": {"seed": [1, 2]}}', (), "grid['seed']: conflicting overrides, config.seed is set by seeds"),
    ('{"gird": {"seed": [1, 2]}}', (), "unknown key(s) 'gird'"),
])
def test_bad_sweep_fails_before_any_run_naming_the_entry(tmp_path, capsys, body, extra, message):
  sweep_file = _sweep_file(tmp_path, f"def get_sweep():\n  return {body}\n")
  workdir = tmp_path / "sweep"
  code = cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}", "--nowandb",
                   *extra])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith(f"kdlab: error: --sweep={sweep_file}: ") and message in err[0], err[0]
  assert not workdir.exists()


def test_bad_sweep_leaves_an_existing_sweep_untouched(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  (workdir / "results.md").write_text("earlier results")
  before = tree_snapshot(workdir)
  sweep_file = _sweep_file(tmp_path, 'def get_sweep():\n  return {"grid": {"model.hiden": [(8, 8)]}}\n')
  assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}"]) == 2
  assert "grid['model.hiden']" in capsys.readouterr().err
  assert tree_snapshot(workdir) == before


def test_a_changed_base_config_is_refused_for_existing_runs(uninterrupted, capsys):
  sweep_file, full = uninterrupted
  before = tree_snapshot(full)
  assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={full}",
                   "--config.train.num_epochs=2.0"]) == 2
  assert "holds a run with a different config" in capsys.readouterr().err
  assert tree_snapshot(full) == before


# Planning (no training).

def test_grid_with_tied_paths(tmp_path):
  sweep_file = _sweep_file(tmp_path, """
def get_sweep():
  return {"seeds": [0, 3], "grid": {"objective[1].temperature": [1, 4.0],
                                    ("objective[0].weight", "objective[1].weight"): [(0.9, 0.1), (0.5, 0.5)]},
          "labels": {"objective[1].weight": "alpha"}}
""", name="ta.py")
  sweep, base = ksweep.plan(f"{HINTON}:kd", sweep_file, ["--config.train.num_epochs=2"])
  assert sweep.name == "ta" and sweep.kind == "grid" and len(sweep.runs()) == 8
  assert [s.name for s in sweep.settings] == [
      "objective.1.temperature=1,objective.0.weight=0.9,objective.1.weight=0.1",
      "objective.1.temperature=1,objective.0.weight=0.5,objective.1.weight=0.5",
      "objective.1.temperature=4,objective.0.weight=0.9,objective.1.weight=0.1",
      "objective.1.temperature=4,objective.0.weight=0.5,objective.1.weight=0.5"]
  assert [r.seed for r in sweep.runs()] == [0] * 4 + [3] * 4  # Seed-major: every setting once first.
  run = sweep.runs()[6]
  config = ksweep.run_config(base, sweep, run)
  assert config.seed == 3 and config.train.num_epochs == 2.0
  assert config.objective[0]["weight"] == 0.9 and config.objective[1]["weight"] == 0.1
  assert config.objective[1]["temperature"] == 4.0 and isinstance(sweep.runs()[0].setting.values[
      "objective[1].temperature"], float)  # The int 1 became the field's float.
  assert config.wandb_group == "ta"
  assert config.wandb_tags == ["objective[1].temperature=4", "objective[0].weight=0.9", "alpha=0.1", "seed=3"]
  assert sweep.axis_label(sweep.axes[1]) == "alpha" and sweep.tick(sweep.axes[1], run.setting) == "0.1"


def test_list_and_random_sweeps(tmp_path):
  list_file = _sweep_file(tmp_path, """
def get_sweep():
  return {"list": [{"model.hidden": (32, 32)}, {"optimizer.name": "sgd", "optimizer.learning_rate": 0.1}]}
""", name="methods.py")
  sweep, _ = ksweep.plan(STUDENT, list_file)
  assert [s.name for s in sweep.settings] == ["model.hidden=32x32",
                                             "optimizer.name=sgd,optimizer.learning_rate=0.1"]
  # A path an entry does not set shows the config's own value.
  assert sweep.settings[1].values == {"model.hidden": [64, 64], "optimizer.name": "sgd",
                                      "optimizer.learning_rate": 0.1}
  assert sweep.settings[0].values["optimizer.learning_rate"] == 0.01

  random_file = _sweep_file(tmp_path, """
def get_sweep():
  return {"random": {"num_samples": 5, "seed": 7, "space": {
      "optimizer.learning_rate": ("loguniform", 1e-4, 1e-1), "model.hidden": [(16, 16), (32, 32)]}}}
""", name="rand.py")
  first, _ = ksweep.plan(STUDENT, random_file)
  again, _ = ksweep.plan(STUDENT, random_file)
  assert [s.name for s in first.settings] == [s.name for s in again.settings]
  for s in first.settings:
    lr = s.values["optimizer.learning_rate"]
    assert 1e-4 <= lr <= 1e-1 and float(f"{lr:.4g}") == lr and s.values["model.hidden"] in ([16, 16], [32, 32])


def test_setting_names_are_safe_and_distinct():
  assert ksweep.setting_name([]) == "default"
  assert ksweep.setting_name([("objective[1].temperature", 4.0)]) == "objective.1.temperature=4"
  assert ksweep.setting_name([("data.source", "tfds:mnist/3")]) == "data.source=tfds_mnist_3"
  assert ksweep.setting_name([("optimizer.learning_rate", 1e-5)]) == "optimizer.learning_rate=1e-05"
  long = ksweep.setting_name([(f"model.f{i}", 1) for i in range(40)])
  assert len(long) == 200 and long != ksweep.setting_name([(f"model.f{i}", 2) for i in range(40)])
  with pytest.raises(UserError, match="cannot parse"):
    ksweep.canonical("objective[1]..x")
