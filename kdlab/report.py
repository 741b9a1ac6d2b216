"""``kdlab report DIR``: a markdown report with PNG plots for a sweep or a single run.

For a sweep's workdir (it holds ``sweep.json``) it rewrites ``results.csv`` and
``results.md`` and writes ``report.md`` with:

  learning_curves.png  test accuracy per epoch for each setting: mean over seeds, min-max band
  heatmap.png          two-axis grids: mean last-epoch test accuracy per cell (+/- std)
  comparison.png       test error (%) per setting, bars from zero with std error bars over seeds

Language-model sweeps plot validation loss (nats per token) instead: its learning curves per step
and its last value per setting (no heatmap).

For one run's workdir (``metrics.jsonl``): learning curves (test accuracy and
training loss) and a table of its ``summary.json``. Plots use matplotlib's Agg
canvas through ``Figure`` (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np

from kdlab import sweep as ksweep
from kdlab.errors import UserError
from kdlab.train.logging import read_metrics

_PANEL_LINES = 6  # Settings per learning-curve panel when the sweep is not a two-axis grid.


def report(workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes ``workdir/report.md`` (and its PNGs); returns its path."""
  workdir = pathlib.Path(workdir)
  if (workdir / "sweep.json").exists():
    return _sweep_report(workdir)
  if (workdir / "metrics.jsonl").exists() or (workdir / "summary.json").exists():
    return _run_report(workdir)
  raise UserError(f"{workdir}: neither a sweep directory (sweep.json) nor a run directory (metrics.jsonl); "
                  f"pass a sweep's --workdir or a run's --workdir")


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # Lazy: matplotlib costs about a second to import.
  return Figure(figsize=(width, height), layout="constrained")


def eval_curve(run_dir: pathlib.Path, key: str = "test/accuracy", x: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
  """(x, values) of a run's evaluation lines in ``metrics.jsonl``: epochs and test accuracies by default."""
  evals = [m for m in read_metrics(run_dir) if key in m]
  return np.asarray([m[x] for m in evals], float), np.asarray([m[key] for m in evals], float)


# What a sweep's curves show: (metrics.jsonl key, x-axis key, scale, axis label).
_ACCURACY = ("test/accuracy", "epoch", 100.0, "test accuracy (%)")
_VAL_LOSS = ("val/loss", "step", 1.0, "val loss (nats/token)")


def _setting_curve(workdir: pathlib.Path, sweep: ksweep.Sweep, setting: ksweep.Setting,
                   metric: tuple[str, str, float, str] = _ACCURACY):
  """Mean, min and max of ``metric`` (test accuracy in %) over the finished seeds, at the evaluations
  they all made."""
  key, x, scale, _ = metric
  runs = [ksweep.Run(setting, seed) for seed in sweep.seeds]
  curves = [eval_curve(workdir / run.name, key, x) for run in runs if ksweep.finished(workdir, run)]
  curves = [c for c in curves if len(c[0])]
  if not curves:
    return None
  n = min(len(e) for e, _ in curves)  # Runs of one setting evaluate at the same steps.
  values = scale * np.stack([a[:n] for _, a in curves])
  return curves[0][0][:n], values.mean(0), values.min(0), values.max(0), len(curves)


def _panels(sweep: ksweep.Sweep) -> list[tuple[str, list[tuple[str, ksweep.Setting]]]]:
  """Groups of (line label, setting): one panel per first-axis value for a 2-axis grid, else chunks."""
  if sweep.kind == "grid" and len(sweep.axes) == 2:
    a0, a1 = sweep.axes
    groups: dict[str, list] = {}
    for s in sweep.settings:
      groups.setdefault(f"{sweep.axis_label(a0)} = {sweep.tick(a0, s)}", []).append(
          (f"{sweep.axis_label(a1)} = {sweep.tick(a1, s)}", s))
    return list(groups.items())
  label = (lambda s: ", ".join(f"{sweep.axis_label(a)}={sweep.tick(a, s)}" for a in sweep.axes) or s.name)
  items = [(label(s), s) for s in sweep.settings]
  chunks = [items[i:i + _PANEL_LINES] for i in range(0, len(items), _PANEL_LINES)]
  return [("" if len(chunks) == 1 else f"settings {i * _PANEL_LINES + 1}-{i * _PANEL_LINES + len(c)}", c)
          for i, c in enumerate(chunks)]


def plot_learning_curves(workdir: pathlib.Path, sweep: ksweep.Sweep, out: pathlib.Path, lm: bool = False) -> bool:
  """Per setting, test accuracy (``lm``: validation loss) per evaluation: mean and min-max over seeds."""
  metric = _VAL_LOSS if lm else _ACCURACY
  panels = _panels(sweep)
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig = _figure(5.0 * cols, 3.6 * rows)
  axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
  drawn = False
  for ax, (title, items) in zip(axes, panels):
    for label, setting in items:
      curve = _setting_curve(workdir, sweep, setting, metric)
      if curve is None:
        continue
      epochs, mean, lo, hi, n = curve
      line, = ax.plot(epochs, mean, marker="o", ms=3, label=f"{label} ({n} seed{'s' if n > 1 else ''})")
      if n > 1:
        ax.fill_between(epochs, lo, hi, alpha=0.2, color=line.get_color())
      drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(metric[1])
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  axes[0].set_ylabel(metric[3])
  fig.suptitle(f"{sweep.name}: {metric[3].split(' (')[0]}, mean and min-max over seeds")
  if drawn:
    fig.savefig(out, dpi=110)
  return drawn


def _cell_stats(workdir: pathlib.Path, sweep: ksweep.Sweep) -> dict[str, dict[str, Any]]:
  return {r["setting"].name: r for r in ksweep.stats(workdir, sweep)}


def plot_heatmap(workdir: pathlib.Path, sweep: ksweep.Sweep, out: pathlib.Path) -> bool:
  """Mean last-epoch test accuracy (%) over the two axes of a grid; empty cells are unfinished."""
  a0, a1 = sweep.axes
  rows_t = list(dict.fromkeys(sweep.tick(a0, s) for s in sweep.settings))
  cols_t = list(dict.fromkeys(sweep.tick(a1, s) for s in sweep.settings))
  stats = _cell_stats(workdir, sweep)
  mean = np.full((len(rows_t), len(cols_t)), np.nan)
  text = [["" for _ in cols_t] for _ in rows_t]
  for s in sweep.settings:
    acc = stats[s.name]["test_accuracy"]
    if acc:
      i, j = rows_t.index(sweep.tick(a0, s)), cols_t.index(sweep.tick(a1, s))
      mean[i, j] = 100 * np.mean(acc)
      text[i][j] = ksweep.mean_std(acc, "{:.2f}", 100).replace(" +/- ", "\n+/- ")
  if np.isnan(mean).all():
    return False
  fig = _figure(1.6 + 1.3 * len(cols_t), 1.4 + 0.8 * len(rows_t))
  ax = fig.subplots()
  image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", aspect="auto")
  lo, hi = np.nanmin(mean), np.nanmax(mean)
  for i in range(len(rows_t)):
    for j in range(len(cols_t)):
      if text[i][j]:
        dark = hi > lo and (mean[i, j] - lo) / (hi - lo) < 0.6
        ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="white" if dark else "black")
  ax.set_xticks(range(len(cols_t)), cols_t)
  ax.set_yticks(range(len(rows_t)), rows_t)
  ax.set_xlabel(sweep.axis_label(a1))
  ax.set_ylabel(sweep.axis_label(a0))
  n = len(sweep.seeds)
  ax.set_title(f"{sweep.name}: last-epoch test accuracy (%),\nmean +/- std over {n} seed{'s' if n > 1 else ''}",
               fontsize=10)
  fig.colorbar(image, ax=ax, label="test accuracy (%)")
  fig.savefig(out, dpi=110)
  return True


def plot_comparison(workdir: pathlib.Path, sweep: ksweep.Sweep, out: pathlib.Path, lm: bool = False) -> bool:
  """Horizontal bars of last-epoch test error (%) (``lm``: last validation loss) from zero, std error
  bars; a dot per seed."""
  key = "val_loss" if lm else "test_accuracy"
  rows = [r for r in ksweep.stats(workdir, sweep) if r.get(key)]
  if not rows:
    return False
  labels = [", ".join(f"{sweep.axis_label(a)}={sweep.tick(a, r['setting'])}" for a in sweep.axes)
            or r["setting"].name for r in rows]
  errors = [np.asarray(r[key], float) if lm else 100 * (1 - np.asarray(r[key])) for r in rows]
  mean = np.asarray([e.mean() for e in errors])
  std = np.asarray([e.std(ddof=1) if len(e) > 1 else 0.0 for e in errors])
  fig = _figure(7.0, 1.2 + 0.35 * len(rows))
  ax = fig.subplots()
  y = np.arange(len(rows))
  ax.barh(y, mean, xerr=std, color="tab:blue", alpha=0.7, capsize=3, label="mean +/- std")
  for k, e in enumerate(errors):
    ax.plot(e, np.full(len(e), y[k]), "k.", ms=4, label="one seed" if k == 0 else None)
  ax.set_yticks(y, labels, fontsize=8)
  ax.invert_yaxis()
  what = "validation loss (nats/token)" if lm else "test error (%)"
  ax.set_xlabel(f"last {what}" if lm else f"last-epoch {what}")
  ax.set_xlim(left=0)
  ax.grid(axis="x", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title(f"{sweep.name}: {what.split(' (')[0]} per setting (lower is better)", fontsize=10)
  fig.savefig(out, dpi=110)
  return True


def _sweep_report(workdir: pathlib.Path) -> pathlib.Path:
  sweep, table = ksweep.aggregate(workdir)
  done = sum(ksweep.finished(workdir, r) for r in sweep.runs())
  lm = ksweep.sweep_is_lm(workdir, sweep)  # Language models: validation loss instead of test accuracy.
  lines = [f"# Sweep `{sweep.name}`", "", ksweep.describe(sweep, lm), "",
           f"{done} of {len(sweep.runs())} runs finished ({len(sweep.settings)} settings x seeds {sweep.seeds}). "
           f"Per run: `results.csv`.", "", table, ""]
  best = _best(workdir, sweep, lm)
  if best:
    lines += [best, ""]
  figures = []
  if (not lm and sweep.kind == "grid" and len(sweep.axes) == 2
      and plot_heatmap(workdir, sweep, workdir / "heatmap.png")):
    figures.append(("Mean last-epoch test accuracy over the grid", "heatmap.png"))
  if plot_comparison(workdir, sweep, workdir / "comparison.png", lm):
    figures.append((f"{'Validation loss' if lm else 'Test error'} per setting (bars: mean, error bars: std over "
                    f"seeds, dots: seeds)", "comparison.png"))
  if plot_learning_curves(workdir, sweep, workdir / "learning_curves.png", lm):
    figures.append(("Learning curves (mean and min-max over seeds)", "learning_curves.png"))
  for title, png in figures:
    lines += [f"## {title}", "", f"![{title}]({png})", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path


def _best(workdir: pathlib.Path, sweep: ksweep.Sweep, lm: bool = False) -> str:
  key = "val_loss" if lm else "test_accuracy"
  rows = [r for r in ksweep.stats(workdir, sweep) if r.get(key)]
  if len(rows) < 2:
    return ""
  r = (min if lm else max)(rows, key=lambda r: np.mean(r[key]))
  what = ", ".join(f"{sweep.axis_label(a)} = {sweep.tick(a, r['setting'])}" for a in sweep.axes) or r["setting"].name
  seeds = f"{len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''}"
  if lm:
    return f"Best by mean last validation loss: {what} ({ksweep.mean_std(r[key], '{:.4f}')} nats/token, {seeds})."
  return f"Best by mean last-epoch test accuracy: {what} ({ksweep.mean_std(r[key], '{:.2f}', 100)}%, {seeds})."


def _run_report(workdir: pathlib.Path) -> pathlib.Path:
  metrics = read_metrics(workdir)
  evals = [m for m in metrics if "test/accuracy" in m]
  # Language-model runs evaluate validation loss (nats per token) instead of test accuracy.
  key, scale, label = ("test/accuracy", 100, "test accuracy (%)") if evals else ("val/loss", 1, "val loss (nats/token)")
  evals = evals or [m for m in metrics if "val/loss" in m]
  train = [m for m in metrics if "loss" in m]
  # A sweep's run is SETTING/seed=N: its name alone says little.
  name = f"{workdir.parent.name}/{workdir.name}" if workdir.name.startswith("seed=") else workdir.name
  lines = [f"# Run `{name}`", ""]
  config = workdir / "config.json"
  if config.exists():
    c = json.loads(config.read_text())
    model = c.get("model", {})
    lines += [f"Model `{model.get('name')}`, data `{c.get('data', {}).get('source')}`, seed {c.get('seed')}, "
              f"objective: {', '.join(_term(t) for t in c.get('objective', []))}. Full config: `config.json`.", ""]
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(k, v)} |" for k, v in summary.items()]
    lines += ["", "Last epoch = the final model; best epoch = the best of the periodic evaluations (highest "
              "test accuracy, or lowest validation loss for language models; selected on the evaluated split "
              "itself, so optimistic).", ""]
  else:
    lines += ["Not finished (no `summary.json`): the curves show the evaluations so far.", ""]
  if evals or train:
    fig = _figure(10.0, 3.6)
    ax_acc, ax_loss = fig.subplots(1, 2)
    if evals:
      ax_acc.plot([m["epoch"] for m in evals], [scale * m[key] for m in evals], marker="o", ms=3)
    ax_acc.set(xlabel="epoch", ylabel=label, title=label.split(" (")[0])
    if train:
      ax_loss.plot([m["epoch"] for m in train], [m["loss"] for m in train], label="loss")
      for key in sorted({k for m in train for k in m if k.startswith(("task/", "distill/"))}):
        points = [(m["epoch"], m[key]) for m in train if key in m]
        ax_loss.plot(*zip(*points), lw=1, alpha=0.8, label=key)
      ax_loss.legend(fontsize=7)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (per logging window)")
    for ax in (ax_acc, ax_loss):
      ax.grid(alpha=0.3)
    fig.savefig(workdir / "learning_curves.png", dpi=110)
    lines += ["## Learning curves", "", "![Learning curves](learning_curves.png)", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path


def _term(term: dict[str, Any]) -> str:
  extra = ", ".join(f"{k}={v}" for k, v in term.items() if k not in ("loss", "weight"))
  return f"{term.get('weight')} x {term.get('loss')}" + (f" ({extra})" if extra else "")


def _fmt(key: str, value: Any) -> str:
  if isinstance(value, float):
    return f"{100 * value:.2f}%" if "accuracy" in key or "agreement" in key else f"{value:.4g}"
  if isinstance(value, Sequence) and not isinstance(value, str):
    return " ".join(map(str, value))
  return "-" if value is None else str(value)
