"""Every distillation method of kdlab on real data: resnet14 -> resnet8 on mnist5k, 3 seeds each.

The settings are those of ``configs/mnist5k_resnet.py``: the from-scratch student (CE only) and one
setting per method of its ``METHODS`` (the CRD table of RepDistiller, DKD, and kdlab's other terms
that apply to a CNN classifier), each with RepDistiller's / mdistiller's weights. Run everything
(teacher, sweep, table and chart; about 30 minutes on 2 quiet CPU cores) with

  .venv/bin/python experiments/mnist5k_methods.py [--parallel 2] [--root runs/mnist5k_methods]

which is

  kdlab train --config=configs/mnist5k_resnet.py:teacher --workdir=ROOT/teacher
  kdlab sweep --config=configs/mnist5k_resnet.py:kd,teacher=ROOT/teacher/checkpoints \\
      --sweep=experiments/mnist5k_methods.py:teacher=ROOT/teacher/checkpoints --workdir=ROOT/sweep --parallel=2

and then writes ``experiments/results/mnist5k_methods/{results.md,results.csv,methods.png}``.
Then ``--diagnostics`` runs the diagnostic settings of :data:`DIAGNOSTICS` (other weights or stages
for the methods that end below the from-scratch student, and their controls)
into ``ROOT/diagnostics`` and adds their table. ``--report-only`` rewrites the files from
the runs on disk. Every step resumes: rerun the same command after an interruption. ``--quick`` is
a smoke test on ``digits`` (1 seed, 1 epoch, small batches) whose files go to ``ROOT/quick``.

As a sweep file, ``get_sweep("OPTIONS")`` is a ``list`` sweep: one entry per method, each setting
the fields in which that method's config differs from the ``kd`` config (``method``, ``objective``,
and where needed ``teachers``, ``connector_warmup_steps``, ``train.num_epochs``). ``OPTIONS`` are the
config options (``epochs=N``, ``teacher=DIR``, ...; the sweep's ``--config`` must be ``:kd`` with the
same options) plus ``methods=a/b`` and ``seeds=0/1`` to run a subset, and ``diagnostics`` for the
diagnostic settings instead of the methods.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = "configs/mnist5k_resnet.py"
SWEEP = "experiments/mnist5k_methods.py"
RESULTS = "experiments/results/mnist5k_methods"
SEEDS = [0, 1, 2]
# Fields a method's config may differ in from the kd config; the sweep overrides exactly these.
FIELDS = ("teachers", "objective", "connector_warmup_steps", "train.num_epochs", "train.checkpoint_every_epochs")
SWEEP_OPTIONS = ("methods", "seeds", "diagnostics")


def _term(objective: list[dict[str, Any]], loss: str) -> dict[str, Any]:
  return next(t for t in objective if t["loss"] == loss)


def _set_weight(loss: str, weight: float) -> Callable[[Any], None]:
  def edit(config: Any) -> None:
    _term(config.objective, loss)["weight"] = weight
  return edit


def _epochs(epochs: float) -> Callable[[Any], None]:
  def edit(config: Any) -> None:
    config.train.num_epochs = config.train.checkpoint_every_epochs = epochs
  return edit


def _no_init_loss(config: Any) -> None:
  """ab / fsp with their init stage kept but its loss removed: CE only, after the same idle steps."""
  config.objective = [t for t in config.objective if t["loss"] == "ce"]


# Diagnostic settings: name -> (method, what changes, edit of that method's config).
DIAGNOSTICS: dict[str, tuple[str, str, Callable[[Any], None]]] = {
    "at, weight 100": ("at", "AT weight 1000 -> 100", _set_weight("at", 100.0)),
    "at, weight 10": ("at", "AT weight 1000 -> 10", _set_weight("at", 10.0)),
    "ab/fsp init stage, no loss": ("ab", "the init stage's steps kept (student idle), no AB loss: the "
                                   "control for ab and fsp", _no_init_loss),
    "jsd, CE weight 1": ("jsd", "CE weight 0.1 -> 1", _set_weight("ce", 1.0)),
    "fitnet, weight 10": ("fitnet", "hint weight 100 -> 10", _set_weight("fitnet", 10.0)),
    "crd, weight 0.2": ("crd", "CRD weight 0.8 -> 0.2", _set_weight("crd", 0.2)),
    "crd, 9 epochs": ("crd", "as in the table, 9 epochs instead of 3 (each memory-bank entry updated 9 "
                      "times instead of 3)", _epochs(9.0)),
    "student, 9 epochs": ("student", "from scratch, 9 epochs: the control for crd, 9 epochs", _epochs(9.0)),
}


def _config_module():
  from kdlab import config as kconfig
  return kconfig.load_python_file(ROOT / CONFIG, "kdlab_config")


def _split(arg: str | None) -> tuple[str, dict[str, str]]:
  """``"epochs=3,methods=kd/at,seeds=0"`` -> (config options ``"epochs=3"``, sweep options)."""
  config_opts, sweep_opts = [], {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key in SWEEP_OPTIONS:
      sweep_opts[key] = value
    else:
      config_opts.append(part)
  return ",".join(config_opts), sweep_opts


def _get(config: Any, path: str) -> Any:
  node = config
  for key in path.split("."):
    node = node[key]
  return node.to_dict() if hasattr(node, "to_dict") else node


def _plain(value: Any) -> Any:
  return json.loads(json.dumps(value))


def get_sweep(arg: str | None = None) -> dict[str, Any]:
  config_opts, sweep_opts = _split(arg)
  module = _config_module()
  suffix = "," + config_opts if config_opts else ""
  base = module.get_config("kd" + suffix)
  settings = []  # (name, config)
  if "diagnostics" in sweep_opts:
    for name, (method, _, edit) in DIAGNOSTICS.items():
      config = module.get_config(method + suffix)
      edit(config)
      config.method = name
      settings.append((name, config))
  else:
    methods = ["student", *module.METHODS]
    if sweep_opts.get("methods"):
      methods = sweep_opts["methods"].split("/")
      unknown = [m for m in methods if m not in ("student", *module.METHODS)]
      if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from student, {', '.join(module.METHODS)}")
    settings = [(m, module.get_config(m + suffix)) for m in methods]
  entries = []
  for name, config in settings:
    entry = {"method": name}
    for field in FIELDS:
      value = _plain(_get(config, field))
      if value != _plain(_get(base, field)):
        entry[field] = value
    entries.append(entry)
  seeds = [int(s) for s in sweep_opts["seeds"].split("/")] if sweep_opts.get("seeds") else SEEDS
  name = "mnist5k_methods" + ("_diagnostics" if "diagnostics" in sweep_opts else "")
  return {"name": name, "seeds": seeds, "list": entries, "labels": {"method": "method"}}


# ----------------------------------------------------------------------------------------------
# Running it.

class LoadSampler:
  """Samples the 1-minute load average every ``every`` seconds in a background thread."""

  def __init__(self, every: float = 15.0):
    self.samples: list[float] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

  def _run(self, every: float) -> None:
    while True:
      self.samples.append(os.getloadavg()[0])
      if self._stop.wait(every):
        return

  def __enter__(self) -> LoadSampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def _cpu_s() -> float:
  """CPU seconds (user + system) of every finished child process so far (sweep workers included)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], env: dict[str, str], steps: list[dict[str, Any]]) -> None:
  """Runs ``cmd``, appending its wall and CPU time (and exit status) to ``steps`` even if it fails."""
  print("+", shlex.join(cmd), flush=True)
  start, cpu = time.time(), _cpu_s()
  try:
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
  finally:
    steps.append({"wall_s": time.time() - start, "cpu_s": _cpu_s() - cpu})
  steps[-1]["returncode"] = code
  if code:
    raise subprocess.CalledProcessError(code, cmd)


def _timed(name: str, cmds: list[list[str]], env: dict[str, str], root: pathlib.Path, parallel: int) -> None:
  """Runs ``cmds`` in order, sampling the load; appends this attempt's wall and CPU time to
  ``root/timing.json`` (an interrupted attempt too: a rerun resumes, and the report sums them)."""
  start, steps = time.time(), []
  try:
    with LoadSampler() as load:
      for cmd in cmds:
        _run(cmd, env, steps)
  finally:
    path = root / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing.setdefault(name, []).append(dict(
        total_s=time.time() - start, steps=steps, load=load.samples, cores=os.cpu_count(), parallel=parallel,
        commands=[shlex.join(["kdlab", *c[3:]]) for c in cmds], finished=time.strftime("%Y-%m-%d %H:%M"),
        complete=len(steps) == len(cmds) and not any(s.get("returncode") for s in steps)))
    path.write_text(json.dumps(timing, indent=2))


def _short(path: pathlib.Path) -> pathlib.Path:
  """``path`` relative to the repository when it is inside it (the commands run from there)."""
  return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/mnist5k_methods", help="where the runs go")
  parser.add_argument("--parallel", type=int, default=2, help="sweep worker processes")
  parser.add_argument("--options", default="", help="extra config options, e.g. epochs=4")
  parser.add_argument("--quick", action="store_true", help="smoke test on digits, 1 seed")
  parser.add_argument("--diagnostics", action="store_true", help="run the diagnostic settings (after the methods)")
  parser.add_argument("--report-only", action="store_true", help="only rewrite the results from the runs")
  parser.add_argument("--out", default=RESULTS, help="where results.md, results.csv and the chart go")
  args = parser.parse_args(argv)

  root = (ROOT / args.root / ("quick" if args.quick else "")).resolve()
  opts = [o for o in args.options.split(",") if o]
  if args.quick:
    opts = ["source=digits", "quick", *opts]
  teacher_dir = _short(root / "teacher")
  config_opts = ",".join([*opts, f"teacher={teacher_dir}/checkpoints"])
  seeds = ",seeds=0" if args.quick else ""
  kdlab = [sys.executable, "-m", "kdlab"]
  sweep = lambda name, extra, flags: [
      *kdlab, "sweep", f"--config={CONFIG}:kd,{config_opts}", f"--sweep={SWEEP}:{config_opts}{seeds}{extra}",
      f"--workdir={_short(root / name)}", f"--parallel={args.parallel}", "--nowandb", *flags]
  teacher_cmd = [*kdlab, "train", f"--config={CONFIG}:" + ",".join(["teacher", *opts]),
                 f"--workdir={teacher_dir}", "--nowandb", "--no-progress"]
  # Runs of one setting differ only in their seed and compile the same programs (so do many of the
  # settings' model initializations): a persistent compilation cache saves the later ones compiling.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  root.mkdir(parents=True, exist_ok=True)
  if args.diagnostics:
    _timed("diagnostics", [sweep("diagnostics", ",diagnostics", [])], env, root, args.parallel)
  elif not args.report_only:
    _timed("methods", [teacher_cmd, sweep("sweep", "", [])], env, root, args.parallel)
  out = root / "results" if args.quick else ROOT / args.out
  write_results(root, out)


# ----------------------------------------------------------------------------------------------
# The table and the chart.

# Paper of each method (docs/losses.md), for the table.
PAPERS = {
    "kd": "Hinton et al. 2015", "fitnet": "Romero et al. 2015", "at": "Zagoruyko & Komodakis 2017",
    "sp": "Tung & Mori 2019", "cc": "Peng et al. 2019", "vid": "Ahn et al. 2019", "rkd": "Park et al. 2019",
    "pkt": "Passalis & Tefas 2018", "ab": "Heo et al. 2019", "ft": "Kim et al. 2018", "fsp": "Yim et al. 2017",
    "nst": "Huang & Wang 2017", "crd": "Tian et al. 2020", "crd+kd": "Tian et al. 2020", "dkd": "Zhao et al. 2022",
    "reverse_kl": "Gu et al. 2024 (MiniLLM)", "jsd": "Agarwal et al. 2024 (GKD)", "tvd": "Wen et al. 2023",
    "logit_l2": "Ba & Caruana 2014", "hard_ce": "pseudo-labels", "info_nce": "Oord et al. 2018 (in-batch)",
}
# What the diagnostics showed for the methods whose mean ends below the from-scratch student's
# (figures from the 2026-11-23 runs: the diagnostics table, and the runs' metrics.jsonl where named).
NOTES: dict[str, str] = {
    "fitnet": "within noise (0.07 pp = 0.7 test errors, under one seed's std); with hint weight 10 instead of "
              "RepDistiller's 100 it is +0.80 pp (diagnostics): 100 is tuned for 240 CIFAR epochs, in a 3-epoch "
              "run the hint competes with CE throughout",
    "at": "the weight: RepDistiller's 1000 (for 240 epochs) makes AT's weighted gradient 5.5x CE's over the first "
          "20 steps (seed 0 with `config.train.term_grad_norms=True`: 5.29 vs 0.97), train accuracy at step 80 is "
          "48% (85% at weight 100) and 186 steps do not recover; weight 100: +0.23 pp, weight 10: +0.73 pp",
    "ab": "the init stage's cost (the control, 23 of 209 steps without CE, is -0.83 pp) plus AB's margin loss "
          "inflating the student's weights in those 23 steps at lr 0.1: parameter L2 norm 43.5 after them vs 28.0 "
          "in the control (seed 0's l2_params), which with batch norm lowers the effective learning rate of the "
          "CE phase; test accuracy at epoch 2 is 66% vs the control's 44% but ends 2.3 pp below it",
    "fsp": "the init stage's cost: the control (same 23 of 209 steps without CE, no FSP loss) ends at -0.83 pp; "
           "fsp is 0.53 pp above that control",
    "crd": "1.2 seed stds below; not the weight (0.2 instead of 0.8: -0.17 pp) and not the short schedule (at 9 "
           "epochs, each memory-bank entry updated 9 times: 97.47 vs 98.00 from scratch, still -0.53 pp); with "
           "10 classes about 1 in 10 of CRD's 4,096 uniformly drawn negatives is a same-class digit (1 in 100 "
           "on CIFAR-100) that the loss pushes away (not tested); crd+kd is +1.33 pp",
    "jsd": "JSD saturates when the distributions are far apart: at 0.1 CE + 0.9 JSD (KD's recipe, T = 4) the "
           "gradient norm at step 20 is 0.32 vs 2.01 for reverse_kl with the same recipe (seed 0's l2_grads), "
           "train accuracy at step 40 25% vs 48%; with CE weight 1 jsd is +0.90 pp",
}


def _weight(w: Any) -> str:
  if isinstance(w, dict):  # A schedule: a switch at a step, or a linear ramp.
    if w.get("steps") == 1 and "transition_begin" in w:
      return f"[{w['init']:g} for {w['transition_begin'] + 1} steps, then {w['end']:g}]"
    return f"[{w.get('init', 0):g} -> {w.get('end', 0):g} over {w.get('steps')} steps]"
  return f"{w:g}"


_SHORT = {"temperature": "T", "student": "taps"}


def _terms(objective: list[dict[str, Any]]) -> str:
  """``0.1 x ce; 0.9 x kd (T=4)``: weights, losses, taps and hyperparameters."""
  out = []
  for t in objective:
    extra = []
    for k, v in t.items():
      if k in ("loss", "weight", "name"):
        continue
      if isinstance(v, list):
        v = "/".join("+".join(x) if isinstance(x, list) else str(x) for x in v)
      elif isinstance(v, float):
        v = f"{v:g}"
      extra.append(f"{_SHORT.get(k, k)}={v}")
    out.append(f"{_weight(t['weight'])} x {t['loss']}" + (f" ({', '.join(extra)})" if extra else ""))
  return "; ".join(out)


def _mean_std(values: list[float]) -> tuple[float, float]:
  import numpy as np
  a = 100 * np.asarray(values, float)
  return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def collect(sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
  """One row per setting of a sweep: its method, objective and its finished seeds' summaries."""
  from kdlab import sweep as ksweep
  sweep = ksweep.load(sweep_dir)
  by_setting = ksweep.summaries(sweep_dir, sweep)
  rows = []
  for setting in sweep.settings:
    runs = by_setting[setting.name]
    dirs = [sweep_dir / setting.name / f"seed={seed}" for seed, _ in runs]
    config = json.loads((dirs[0] / "config.json").read_text()) if dirs else None
    rows.append(dict(method=setting.values["method"], seeds=[s for s, _ in runs], config=config,
                     acc=[s["test_accuracy"] for _, s in runs],
                     agreement=[s["agreement_top1"] for _, s in runs if s.get("agreement_top1") is not None],
                     wall=[s["wall_time_s"] for _, s in runs]))
  return rows


def _row(name: str, about: str, r: dict[str, Any], base: float | None, last: str | None) -> str:
  """A table row: name, paper (or what changes), objective, accuracy, vs scratch, agreement, seeds,
  seconds per run, and ``last`` (a note) unless it is None."""
  import numpy as np
  if not r["acc"]:
    return f"| {name} | {about} | - | not run | | | 0 | |" + ("" if last is None else f" {last} |")
  mean, std = _mean_std(r["acc"])
  delta = "" if base is None else f"{mean - base:+.2f}"
  agree = f"{100 * np.mean(r['agreement']):.2f}" if r["agreement"] else "-"
  cells = [name, about, _terms(r["config"]["objective"]), f"{mean:.2f} +/- {std:.2f}", delta, agree,
           str(len(r["acc"])), f"{np.mean(r['wall']):.0f}"] + ([] if last is None else [last])
  return "| " + " | ".join(cells) + " |"


def methods_table(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> list[str]:
  scratch = next((r for r in rows if r["method"] == "student" and r["acc"]), None)
  base = _mean_std(scratch["acc"])[0] if scratch else None
  lines = ["| method | paper | objective: weight x loss (taps, hyperparameters) | test accuracy (%) | "
           "vs scratch (pp) | agreement with teacher (%) | seeds | s per run | note |",
           "|---|---|---|--:|--:|--:|--:|--:|---|"]
  if teacher:
    t = teacher["summary"]
    acc = 100 * t["test_accuracy"]
    lines.append(f"| **teacher** ({teacher['model']}) | - | 1 x ce, {teacher['epochs']:g} epochs | {acc:.2f} | "
                 f"{'' if base is None else f'{acc - base:+.2f}'} | - | 1 | {t['wall_time_s']:.0f} | |")
  for r in rows:
    if r["method"] == "student":
      name = f"**student from scratch** ({r['config']['model']['name'] if r['config'] else ''})"
      lines.append(_row(name, "-", r, None, ""))
      continue
    note = NOTES.get(r["method"], "")
    if base is not None and r["acc"] and _mean_std(r["acc"])[0] < base and not note:
      note = "below scratch; not investigated"
    lines.append(_row(r["method"], PAPERS.get(r["method"], "-"), r, base, note))
  return lines


def diagnostics_table(rows: list[dict[str, Any]], base: float | None) -> list[str]:
  lines = ["| diagnostic | what changes | objective | test accuracy (%) | vs scratch (pp) | "
           "agreement with teacher (%) | seeds | s per run |",
           "|---|---|---|--:|--:|--:|--:|--:|"]
  for r in rows:
    lines.append(_row(r["method"], DIAGNOSTICS[r["method"]][1] if r["method"] in DIAGNOSTICS else "", r, base, None))
  return lines


def chart(rows: list[dict[str, Any]], teacher: dict[str, Any] | None, out: pathlib.Path, title: str) -> None:
  """Horizontal bars of test error (%) from zero, std error bars, a dot per seed (as kdlab report's)."""
  import numpy as np
  from matplotlib.figure import Figure
  done = sorted((r for r in rows if r["acc"]), key=lambda r: -np.mean(r["acc"]))
  labels = ["from scratch" if r["method"] == "student" else r["method"] for r in done]
  errors = [100 * (1 - np.asarray(r["acc"])) for r in done]
  mean = np.asarray([e.mean() for e in errors])
  std = np.asarray([e.std(ddof=1) if len(e) > 1 else 0.0 for e in errors])
  fig = Figure(figsize=(7.5, 1.6 + 0.3 * len(done)), layout="constrained")
  ax = fig.subplots()
  y = np.arange(len(done))
  ax.barh(y, mean, xerr=std, color=["tab:orange" if r["method"] == "student" else "tab:blue" for r in done],
          alpha=0.75, capsize=3)
  for k, e in enumerate(errors):
    ax.plot(e, np.full(len(e), y[k]), "k.", ms=4, label="one seed" if k == 0 else None)
  scratch = [m for m, r in zip(mean, done) if r["method"] == "student"]
  if scratch:
    ax.axvline(scratch[0], color="tab:orange", ls="--", lw=1, label="student from scratch (mean)")
  if teacher:
    ax.axvline(100 * (1 - teacher["summary"]["test_accuracy"]), color="tab:green", lw=1.5,
               label=f"teacher ({teacher['model']})")
  ax.set_yticks(y, labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("last-epoch test error (%) on the 1,000 test digits: bar = mean, error bar = std over seeds",
                fontsize=8)
  ax.set_xlim(left=0)
  ax.grid(axis="x", alpha=0.3)
  ax.legend(fontsize=7, loc="upper right")
  ax.set_title(title, fontsize=10)
  fig.savefig(out, dpi=110)


def _timing_lines(attempts: list[dict[str, Any]], runs: int, what: str) -> list[str]:
  import numpy as np
  load = np.asarray([x for a in attempts for x in a["load"]] or [np.nan])
  wall = sum(a["total_s"] for a in attempts)
  cpu = sum(s["cpu_s"] for a in attempts for s in a["steps"])
  a = attempts[-1]
  resumed = (f" in {len(attempts)} attempts (an interrupted attempt resumes: finished runs are kept)"
             if len(attempts) > 1 else "")
  return [
      f"- {what}: {runs} runs, {a['parallel']} sweep worker processes on {a['cores']} CPU cores (AMD EPYC, "
      f"no GPU), finished {a['finished']}: **{wall / 60:.1f} min wall**{resumed}.",
      f"- Machine load meanwhile (1-minute load average every 15 s, other engineers' jobs included): mean "
      f"{np.nanmean(load):.1f}, min {np.nanmin(load):.1f}, max {np.nanmax(load):.1f}.",
      f"- CPU time of its processes: {cpu / 60:.1f} min (user + system), i.e. {cpu / 60 / a['cores']:.1f} min "
      f"of the {a['cores']} cores with nothing else running.",
      "", "```sh", *[f".venv/bin/{c}" for c in a["commands"]], "```", ""]


def write_results(root: pathlib.Path, out: pathlib.Path) -> None:
  """``out/results.md``, ``out/results.csv`` and ``out/methods.png`` from the runs under ``root``."""
  from kdlab import sweep as ksweep
  out.mkdir(parents=True, exist_ok=True)
  teacher = None
  if (root / "teacher" / "summary.json").exists():
    config = json.loads((root / "teacher" / "config.json").read_text())
    teacher = dict(summary=json.loads((root / "teacher" / "summary.json").read_text()),
                   model=config["model"]["name"], epochs=config["train"]["num_epochs"])
  rows = collect(root / "sweep")
  (out / "results.csv").write_text(ksweep.results_csv(root / "sweep", ksweep.load(root / "sweep")))
  scratch = next((r for r in rows if r["method"] == "student" and r["acc"]), None)
  student = scratch["config"] if scratch else None
  chart(rows, teacher, out / "methods.png",
        f"mnist5k, {teacher['model'] if teacher else 'teacher'} -> "
        f"{student['model']['name'] if student else 'student'}: every kdlab distillation method")
  timing_path = root / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  runs = sum(len(r["acc"]) for r in rows)
  lines = ["# Every distillation method on real data: resnet14 -> resnet8 on mnist5k", "",
           "Written by `experiments/mnist5k_methods.py` (its docstring says what it runs). Each method is a "
           "variant of `configs/mnist5k_resnet.py` (`kdlab train --config=configs/mnist5k_resnet.py:METHOD`), "
           "whose `method_objective` gives the weights, taps and where each comes from.", ""]
  if student:
    opt = student["optimizer"]
    lines += [
        "**Protocol.** mnist5k: 5,000 real MNIST digits, stratified 4,000 train / 1,000 test (one test error = "
        f"0.1 pp). Teacher: the zoo's CIFAR `{teacher['model'] if teacher else '?'}` with `in_channels=1`, CE, "
        f"trained once. Student: `{student['model']['name']}`, trained from scratch (CE only) or distilled by one "
        f"method, seeds {', '.join(map(str, SEEDS))} (initialization, data order, augmentation). Every student: SGD "
        f"momentum {opt['momentum']}, weight decay {opt['weight_decay']:g}, batch {student['data']['batch_size']}, "
        f"lr {opt['learning_rate']:g} {opt['schedule']}-decayed over {student['train']['num_epochs']:g} epochs, "
        "+/-2 pixel jitter (teacher and student see the same view). Weights, taps and temperatures are RepDistiller's "
        "for its resnet32x4 -> resnet8x4 CIFAR-100 scripts (`-r` CE, `-a` KD at T = 4, `-b` the method) and "
        "mdistiller's for DKD; ab, fsp and ft first run RepDistiller's init stage for 30/240 of the epochs on "
        "top of them (ab and fsp then train with CE alone, as RepDistiller). The methods outside the CRD table: "
        "reverse_kl and jsd with KD's recipe, the others with CE weight 1 and the weight of `docs/losses.md`. "
        "`attention_kl` / `value_relation` need transformer attention maps and do not apply to a CNN; "
        "`top_k_agreement` is a metric.", "",
        "Test accuracy is the last epoch's (no selection on the test set), mean +/- sample std over the seeds; "
        "\"vs scratch\" is the difference of means in percentage points; agreement is top-1 agreement with the "
        "teacher on the test set; \"s per run\" is one run's wall time with start-up and compilation, on the "
        "loaded machine described below.", ""]
  lines += [*methods_table(rows, teacher), "", "![test error per method](methods.png)", ""]
  if "methods" in timing:
    lines += ["## Time and machine", "", *_timing_lines(timing["methods"], runs + 1, "Teacher and sweep")]
  if (root / "diagnostics" / "sweep.json").exists():
    diag = collect(root / "diagnostics")
    lines += ["## Diagnostics of the methods below the from-scratch student", "",
              "The same protocol and seeds (\"vs scratch\": against the 3-epoch from-scratch student above); "
              "what they show is in the note column of the main table.", "",
              *diagnostics_table(diag, _mean_std(scratch["acc"])[0] if scratch else None), ""]
    if "diagnostics" in timing:
      lines += _timing_lines(timing["diagnostics"], sum(len(r["acc"]) for r in diag), "Diagnostics")
  lines += ["Per run: `results.csv` (every seed's summary).", ""]
  (out / "results.md").write_text("\n".join(lines))
  print(f"wrote {out / 'results.md'}, {out / 'methods.png'} and {out / 'results.csv'}")


if __name__ == "__main__":
  main()
