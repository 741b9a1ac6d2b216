"""kdlab sweep: sweep files and variants, validation before any run, kill -9 and resume, failures and retries,
W&B group and tags, results.csv / results.md and the reports' plots (classification and language models)."""

import contextlib
import csv
import io
import json
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from kdlab import cli, report, sweep as ksweep
from kdlab.errors import UserError

from conftest import HINTON, ROOT, child_env, count_train_steps, kdlab_cmd, read_jsonl, tree_snapshot

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


def _trained(out: str) -> list[str]:
  """The runs a sequential sweep's output reports (``[i/n] RUN: result`` or ``[i/n] RUN: FAILED: ...``)."""
  return [l.split("] ", 1)[1].split(": ")[0] for l in out.splitlines() if l.startswith("[")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny sweep (2 learning rates x 2 seeds) run without interruption by two --parallel workers."""
  root = tmp_path_factory.mktemp("sweep")
  sweep_file = _sweep_file(root, TINY)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={root / 'full'}",
                     "--nowandb", "--parallel", "2"]) == 0
  assert "= 4 runs" in out.getvalue() and "0 finished earlier; 2 workers" in out.getvalue(), out.getvalue()
  return sweep_file, root / "full"


def _checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  ckpts = run_dir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def test_killed_sweep_resumes_to_the_same_runs_and_numbers(uninterrupted, tmp_path, capsys, monkeypatch):
  """SIGKILL a sequential ``kdlab sweep`` mid-run; the rerun skips the finished runs, resumes the
  interrupted one from its checkpoint (only its remaining steps), trains the rest, and ends with the
  runs and numbers of the uninterrupted (two-worker) sweep."""
  sweep_file, full = uninterrupted
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_sweep_args(sweep_file, killed), env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

  def partial_run_with_checkpoint():
    return any(not (c.parent / "summary.json").exists() and any(p.name.isdigit() for p in c.iterdir())
               for c in killed.glob("*/seed=*/checkpoints"))

  # Kill -9 once a run has finished and the next one has saved a checkpoint.
  deadline = time.time() + 300
  while time.time() < deadline and not (_finished(killed) and partial_run_with_checkpoint()):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _finished(killed)
  started = sorted(str(p.parent.relative_to(killed)) for p in killed.rglob("config.json"))
  n = len(done)
  # Runs go in order: some finished, the next one interrupted after a checkpoint, the others not started.
  assert 1 <= n <= len(RUNS) - 2 and done == sorted(RUNS[:n]) and started == sorted(RUNS[:n + 1]), started
  assert not (killed / "results.csv").exists() and not any((killed / r).exists() for r in RUNS[n + 1:])
  partial = killed / RUNS[n]
  total = json.loads((full / RUNS[n] / "summary.json").read_text())["steps"]
  resumed_from = _checkpoint_steps(partial)[-1]
  assert 0 < resumed_from < total
  kept = "".join(l + "\n" for l in (partial / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["step"] <= resumed_from)
  before = {r: tree_snapshot(killed / r) for r in done}

  # Rerun (one process): only the interrupted run's remaining steps and the unstarted runs' steps execute.
  steps = count_train_steps(monkeypatch)
  assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={killed}",
                   "--nowandb"]) == 0
  jax.effects_barrier()
  out = capsys.readouterr().out
  assert f"{n} finished earlier" in out
  assert _trained(out) == RUNS[n:], out
  assert sorted(steps) == sorted([*range(resumed_from, total), *list(range(total)) * (len(RUNS) - n - 1)])
  assert {r: tree_snapshot(killed / r) for r in done} == before  # Finished runs: same bytes and mtimes.
  assert (partial / "metrics.jsonl").read_text().startswith(kept)  # The killed run's log up to its checkpoint.

  assert _finished(killed) == _finished(full) == sorted(RUNS)
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


def test_results_csv_lists_every_run_and_results_md_each_settings_mean_and_std(uninterrupted):
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


@pytest.fixture
def drawn(monkeypatch):
  """PNG name -> the matplotlib ``Figure`` saved to it (so a test reads the data a plot draws)."""
  from matplotlib.figure import Figure
  figures, save = {}, Figure.savefig

  def capture(self, path, *args, **kwargs):
    figures[pathlib.Path(path).name] = self
    return save(self, path, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", capture)
  return figures


def test_report_of_the_trained_sweep_and_of_one_run_draws_their_metrics(uninterrupted, drawn):
  """On the real runs: the sweep's learning curves are each setting's mean test accuracy over seeds per
  evaluation, its bars the mean last test error; one run's curves are its own evaluations and losses."""
  _, full = uninterrupted
  assert cli.main(["report", str(full)]) == 0
  text = (full / "report.md").read_text()
  for png in ("comparison.png", "learning_curves.png"):
    assert f"]({png})" in text and (full / png).read_bytes().startswith(b"\x89PNG")
  assert "heatmap.png" not in text and "heatmap.png" not in drawn  # One swept axis: no heatmap.
  by_lr = {lr: [r for r in RUNS if r.startswith(f"optimizer.learning_rate={lr}/")] for lr in ("0.01", "0.003")}
  lines = {l.get_label(): l for l in drawn["learning_curves.png"].axes[0].lines}
  assert set(lines) == {f"optimizer.learning_rate={lr} (2 seeds)" for lr in by_lr}
  for lr, runs in by_lr.items():
    evals = [[l for l in read_jsonl(full / r / "metrics.jsonl") if "test/accuracy" in l] for r in runs]
    line = lines[f"optimizer.learning_rate={lr} (2 seeds)"]
    np.testing.assert_allclose(line.get_xdata(), [l["epoch"] for l in evals[0]])
    np.testing.assert_allclose(line.get_ydata(), np.mean([[100 * l["test/accuracy"] for l in e] for e in evals], 0))
  bars = drawn["comparison.png"].axes[0].patches
  errors = [[100 * (1 - json.loads((full / r / "summary.json").read_text())["test_accuracy"]) for r in runs]
            for runs in by_lr.values()]
  np.testing.assert_allclose([b.get_width() for b in bars], np.mean(errors, 1))

  run = full / RUNS[0]
  drawn.clear()
  report.report(run)
  assert "| test_accuracy |" in (run / "report.md").read_text()
  assert (run / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
  metrics = read_jsonl(run / "metrics.jsonl")
  accuracy, losses = drawn["learning_curves.png"].axes[:2]
  [acc_line] = accuracy.lines
  np.testing.assert_allclose(acc_line.get_ydata(), [100 * l["test/accuracy"] for l in metrics if "test/accuracy" in l])
  loss = {l.get_label(): l for l in losses.lines}["loss"]
  np.testing.assert_allclose(loss.get_xdata(), [l["epoch"] for l in metrics if "loss" in l])
  np.testing.assert_allclose(loss.get_ydata(), [l["loss"] for l in metrics if "loss" in l])


# Failures: a failing run is reported, the others go on, the sweep exits 1 and a rerun retries it.

DIVERGING = """
def get_sweep():
  return {"name": "diverging", "grid": {"optimizer.learning_rate": [1e30, 0.01]}}
"""


def test_a_failing_run_does_not_stop_the_sweep_which_exits_1_and_a_rerun_retries_only_it(tmp_path, capsys,
                                                                                         monkeypatch):
  """docs/sweeps.md: a failing run is reported and the others go on; the sweep exits 1 naming it, and
  rerunning the same command retries the failed runs (finished ones are skipped)."""
  sweep_file = _sweep_file(tmp_path, DIVERGING)
  workdir = tmp_path / "sweep"
  bad, good = "optimizer.learning_rate=1e+30/seed=0", "optimizer.learning_rate=0.01/seed=0"
  args = ["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}", "--nowandb",
          "--config.train.num_epochs=0.5"]
  steps = count_train_steps(monkeypatch)
  assert cli.main(args) == 1
  jax.effects_barrier()
  out, err = capsys.readouterr()
  assert _trained(out) == [bad, good], out  # The diverging run comes first; the next one still trains.
  assert f"[1/2] {bad}: FAILED: Diverged: " in out
  assert err.strip().splitlines()[-1].startswith(f"kdlab: error: 1 run(s) failed: {bad}; ")
  assert _finished(workdir) == [good] and "1 of 2 runs finished" in (workdir / "results.md").read_text()
  assert [(r["run"], r["finished"]) for r in csv.DictReader((workdir / "results.csv").open())] == [
      (bad, "False"), (good, "True")]
  total = json.loads((workdir / good / "summary.json").read_text())["steps"]
  failed_steps = sorted(steps)
  for s in range(total):  # What is left once the good run's steps are taken out: the bad run's.
    failed_steps.remove(s)
  assert failed_steps == list(range(len(failed_steps))) and 0 < len(failed_steps) < total
  assert not _checkpoint_steps(workdir / bad)  # It diverged before its first checkpoint.

  before = tree_snapshot(workdir / good)
  steps.clear()
  assert cli.main(args) == 1
  jax.effects_barrier()
  out, err = capsys.readouterr()
  assert "1 finished earlier" in out and _trained(out) == [bad], out  # Only the failed run is retried ...
  assert sorted(steps) == failed_steps  # ... from its start, as it saved no checkpoint.
  assert f"kdlab: error: 1 run(s) failed: {bad}; " in err
  assert tree_snapshot(workdir / good) == before


def test_sweep_file_arg_reaches_get_sweep(tmp_path):
  """``--sweep=FILE:ARG`` calls ``get_sweep(ARG)``; without ARG, ``get_sweep()``."""
  sweep_file = _sweep_file(tmp_path, """
def get_sweep(arg=None):
  rates = {None: [0.1, 0.01, 0.001], "two": [0.5, 0.05]}[arg]
  return {"name": f"lr_{arg}", "grid": {"optimizer.learning_rate": rates}}
""", name="variants.py")
  full, _ = ksweep.plan(STUDENT, sweep_file)
  two, _ = ksweep.plan(STUDENT, f"{sweep_file}:two")
  assert full.name == "lr_None" and [s.values["optimizer.learning_rate"] for s in full.settings] == [0.1, 0.01, 0.001]
  assert two.name == "lr_two" and [s.values["optimizer.learning_rate"] for s in two.settings] == [0.5, 0.05]
  assert two.command["sweep"] == f"{sweep_file}:two"
  with pytest.raises(UserError, match=r"get_sweep\('three'\)"):
    ksweep.plan(STUDENT, f"{sweep_file}:three")
  # The documented smoke-test variant of the temperature x alpha ablation: a 2 x 2 grid with one seed.
  tiny, _ = ksweep.plan(f"{HINTON}:kd", str(ROOT / "experiments" / "temperature_alpha.py:tiny"))
  full_ta, _ = ksweep.plan(f"{HINTON}:kd", str(ROOT / "experiments" / "temperature_alpha.py"))
  assert (len(tiny.settings), tiny.seeds, len(tiny.axes)) == (4, [0], 2)
  assert (len(full_ta.settings), full_ta.seeds) == (15, [0, 1, 2])


class _FakeWandb(types.ModuleType):
  """Stands in for ``wandb``: records each ``wandb.init`` call's arguments and logged steps."""

  def __init__(self):
    super().__init__("wandb")
    self.runs: list[dict] = []

  def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
    return kwargs

  def init(self, **kwargs):
    record = {"init": kwargs, "logged": []}
    self.runs.append(record)
    return types.SimpleNamespace(log=lambda metrics, step: record["logged"].append(step), finish=lambda: None)


def test_sweep_runs_log_to_wandb_in_the_sweep_group_tagged_with_their_values(tmp_path, monkeypatch):
  """Each run is in the W&B group ``name`` and tagged with its swept values by their labels and its
  seed; ``config.json`` holds the same group and tags."""
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setenv("WANDB_MODE", "offline")
  sweep_file = _sweep_file(tmp_path, """
def get_sweep():
  return {"name": "grouped", "seeds": [3], "labels": {"optimizer.learning_rate": "lr"},
          "grid": {("optimizer.learning_rate", "train.num_steps"): [(0.02, 2)], "model.hidden": [(8, 8)]}}
""")
  workdir = tmp_path / "sweep"
  assert cli.main(["sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={workdir}"]) == 0
  run = "optimizer.learning_rate=0.02,train.num_steps=2,model.hidden=8x8/seed=3"
  tags = ["lr=0.02", "train.num_steps=2", "model.hidden=(8, 8)", "seed=3"]
  config = json.loads((workdir / run / "config.json").read_text())
  assert (config["wandb_group"], config["wandb_tags"]) == ("grouped", tags)
  [record] = fake.runs
  init = record["init"]
  assert (init["group"], init["tags"], init["mode"]) == ("grouped", tags, "offline")
  assert init["config"] == config and init["dir"] == str(workdir / run) and init["name"] == run
  assert record["logged"] and max(record["logged"]) == 2


# Language-model sweeps: the report plots validation loss (docs/lm.md).

LM_SWEEP = """
def get_sweep():
  return {"name": "lm_lr", "seeds": [0, 1], "grid": {"optimizer.learning_rate": [0.003, 0.001]},
          "labels": {"optimizer.learning_rate": "lr"}}
"""


def _fake_lm_sweep(tmp_path: pathlib.Path) -> tuple[pathlib.Path, ksweep.Sweep, dict[str, list[float]]]:
  """A language-model sweep directory as ``kdlab sweep`` leaves it (no training): sweep.json and, per run,
  metrics.jsonl (train lines and val/loss evaluations every 50 steps) and summary.json. The run
  lr=0.001/seed=1 is unfinished. Returns it with each run's evaluated validation losses."""
  sweep, _ = ksweep.plan(f"{ROOT / 'configs' / 'lm_pysrc.py'}:student", _sweep_file(tmp_path, LM_SWEEP))
  workdir = tmp_path / "lm_sweep"
  workdir.mkdir()
  (workdir / "sweep.json").write_text(json.dumps(sweep.to_json()))
  rng = np.random.default_rng(0)
  losses = {}
  for run in sweep.runs():
    run_dir = workdir / run.name
    run_dir.mkdir(parents=True)
    val = list(np.round(np.sort(rng.uniform(1.5, 3.5, 4))[::-1], 4))
    losses[run.name] = val
    lines = []
    for i, v in enumerate(val):
      step = 50 * (i + 1)
      lines.append({"step": step, "epoch": step / 400, "loss": v + 0.1, "task/ce": v + 0.1})
      lines.append({"step": step, "epoch": step / 400, "val/loss": v, "val/ppl": float(np.exp(v)),
                    "val/accuracy": 1 / v})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if run.name != "optimizer.learning_rate=0.001/seed=1":
      (run_dir / "summary.json").write_text(json.dumps({
          "steps": 200, "val_loss": val[-1], "best_val_loss": min(val), "val_ppl": float(np.exp(val[-1])),
          "best_val_ppl": float(np.exp(min(val))), "val_accuracy": 1 / val[-1], "val_tokens": 1000,
          "kl_teacher": 0.1, "agreement_top1": 0.5, "teacher_val_loss": 1.2, "wall_time_s": 1.0,
          "steps_per_s": 5.0}))
  return workdir, sweep, losses


def test_lm_sweep_report_plots_validation_loss_of_the_finished_runs(tmp_path, drawn):
  """docs/lm.md: ``kdlab report`` plots a language-model sweep's validation loss: the learning curves
  are each setting's mean (min-max band) over its finished seeds per evaluation step, and the
  comparison bars each setting's mean last validation loss with a dot per seed."""
  workdir, _, losses = _fake_lm_sweep(tmp_path)
  assert cli.main(["report", str(workdir)]) == 0
  assert set(drawn) == {"learning_curves.png", "comparison.png"}  # No heatmap: one swept axis.
  text = (workdir / "report.md").read_text()
  assert "](learning_curves.png)" in text and "](comparison.png)" in text
  finished = {"0.003": [losses["optimizer.learning_rate=0.003/seed=0"], losses["optimizer.learning_rate=0.003/seed=1"]],
              "0.001": [losses["optimizer.learning_rate=0.001/seed=0"]]}
  best = min(finished, key=lambda lr: np.mean([v[-1] for v in finished[lr]]))
  assert f"Best by mean last validation loss: lr = {best} (" in text

  ax = drawn["learning_curves.png"].axes[0]
  assert ax.get_ylabel() == "val loss (nats/token)" and ax.get_xlabel() == "step"
  lines = {l.get_label(): l for l in ax.lines}
  assert set(lines) == {"lr=0.003 (2 seeds)", "lr=0.001 (1 seed)"}
  for lr, runs in finished.items():
    line = lines[f"lr={lr} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"]
    np.testing.assert_allclose(line.get_xdata(), [50, 100, 150, 200])
    np.testing.assert_allclose(line.get_ydata(), np.mean(runs, axis=0))
  [band] = ax.collections  # The min-max band of the two-seed setting.
  band_y = band.get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose([band_y.min(), band_y.max()], [np.min(finished["0.003"]), np.max(finished["0.003"])])

  ax = drawn["comparison.png"].axes[0]
  assert ax.get_xlabel() == "last validation loss (nats/token)"
  np.testing.assert_allclose([bar.get_width() for bar in ax.patches],
                             [np.mean([v[-1] for v in finished[lr]]) for lr in ("0.003", "0.001")])
  dots = [l for l in ax.lines if l.get_marker() == "."]
  np.testing.assert_allclose(np.concatenate([d.get_xdata() for d in dots]),
                             [v[-1] for lr in ("0.003", "0.001") for v in finished[lr]])


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
    # A setting train would refuse (each is built abstractly before any run): the valid first one is not run.
    pytest.param('{"list": [{"model.hidden": (8, 8)}, {"objective[0].loss": "kd_typo"}]}', (),
                 "setting objective.0.loss=kd_typo: config.objective[0]: unknown loss 'kd_typo'; choose one of ",
                 id="setting_train_refuses"),
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

def test_tied_paths_are_one_grid_axis_set_together_in_seed_major_runs(tmp_path):
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


def test_list_entries_keep_unset_paths_and_random_draws_are_seeded_and_rounded(tmp_path):
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
