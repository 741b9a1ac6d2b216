"""Property-based fuzzing of ``kdlab train`` and ``kdlab sweep`` input (issue 18): overrides of the real
fields of a tiny config, with valid and invalid values, variant options, and sweep files built from the
same fields and values.

Every draw either trains (exit 0) or exits 2 with one ``kdlab: error:`` line, and an existing finished
workdir (a run, a sweep) stays byte-identical. The CLI runs in this process (``kdlab.cli.main``):
refusals cost milliseconds, and most draws are refused; a draw valid up to the workdir check (refused
there as "a different config") is trained in a new workdir, 2 steps; a valid sweep file (at most 2
runs of 2 steps) is trained in a new sweep workdir.

CI runs the ``ci`` profile (tests/conftest.py: fixed seed, 180 draws of overrides and 100 of sweep
files, under 2 minutes on 2 cores). A longer, randomized search (10 times as many draws):

  .venv/bin/python -m pytest -n 0 -p no:cacheprovider tests/test_fuzz.py --hypothesis-profile=long
"""

from __future__ import annotations

import contextlib
import io
import itertools
import pathlib
import shutil
from typing import Any

import ml_collections
import pytest
from hypothesis import event, given, settings, strategies as st

from kdlab import cli, config as kconfig

from conftest import HINTON, tree_snapshot

SPEC = f"{HINTON}:kd,quick,source=digits"
SWEEP_SPEC = f"{HINTON}:student,quick,source=digits"
FLAGS = ("--no-wandb", "--no-progress")
# Extra variant options: the config's own (valid and not) and misspellings.
OPTIONS = ("epochs=2", "epochs=-1", "epochs=x", "omit=3", "omit=x", "omit=0/1/2/3/4/5/6/7/8/9", "source=mnist6k",
           "epoch=3", "quik", "hidden=3", "")
# Fields whose valid values can cost a long run or much memory: their values are drawn from STEPS / SIZES.
COSTLY = ("train.num_steps", "train.num_epochs")
STEPS = st.sampled_from([-1, 0, 1, 2, 1.5, "2", None, -0.5, 0.0, 0.01, 1e-9, "1e999"])
SIZES = st.integers(-2, 4)
SPECIAL = {"seed": st.sampled_from([-1, 0, 3, 2**32 - 2, 2**32 - 1, 2**32, 2**63, 1.5, "0", True])}
# Text of values that are no Python literal, or literals of other types (inf, nan spelled as overflow).
RAW = st.sampled_from(["1e999", "-1e999", "[1,", "(", "{'a':", "nan", "none", "True", "[]", "()", "{}", "''"])
NAMES = st.sampled_from(["", "x", "data", "fsdp", "model", "digits", "mnist5k", "jitter", "adam", "sgd", "kd",
                         "ce", "bfloat16", "float32", "hidden", "/nonexistent", "test/accuracy", "max"])


def _cli(*args: str) -> tuple[int, str]:
  """``kdlab train ARGS`` in this process: its exit status and what it printed to stderr."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["train", *args, *FLAGS])
  return code, err.getvalue()


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """``(path, default)`` of every field of a loaded config: scalars, lists and their entries, dicts."""
  out: list[tuple[str, Any]] = []
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    if prefix:
      out.append((prefix, node.to_dict() if hasattr(node, "to_dict") else dict(node)))
    for key in node.keys():
      out += _leaves(node[key], f"{prefix}.{key}" if prefix else key)
  elif isinstance(node, (list, tuple)):
    out.append((prefix, node))
    for i, item in enumerate(node):
      out += _leaves(item, f"{prefix}[{i}]")
  else:
    out.append((prefix, node))
  return out


def _scalars() -> st.SearchStrategy:
  return st.one_of(SIZES, st.floats(-2, 2), st.booleans(), NAMES, st.none())


def _raw(path: str, default: Any) -> st.SearchStrategy:
  """Python values for ``path``: like its default (in and out of range) and of other types."""
  if path in SPECIAL:
    return SPECIAL[path]
  if path in COSTLY:
    return STEPS
  if isinstance(default, bool):
    return st.one_of(st.booleans(), SIZES)
  if isinstance(default, int):
    return st.one_of(SIZES, st.just(default), st.floats(-2, 2))
  if isinstance(default, float):
    return st.one_of(st.floats(-2, 2), st.sampled_from([0.0, -1.0, 1e-9, 1, default]))
  if isinstance(default, str):
    return st.one_of(NAMES, st.text("ab_/:", max_size=4), st.just(default))
  if isinstance(default, (list, tuple)):
    pairs = st.tuples(NAMES, SIZES)
    return st.lists(st.one_of(SIZES, NAMES, pairs, st.lists(_scalars(), max_size=2)), max_size=3)
  if isinstance(default, dict):
    keys = st.sampled_from(["decay", "generations", "ensemble", "layers", "teacher", "b1", "eps", "keep", "x"])
    return st.dictionaries(keys, _scalars(), max_size=2)
  # None: a section or option left out
  return st.one_of(_scalars(), st.dictionaries(st.sampled_from(["decay", "generations", "layers"]), SIZES,
                                               max_size=1))


def _values(path: str, default: Any) -> st.SearchStrategy:
  """:func:`_raw` values as override text, and text that is no Python literal (or another type's)."""
  values = _raw(path, default).map(repr)
  return st.one_of(values, RAW) if not isinstance(default, str) else values


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
  """A finished teacher run, a finished distilled run (the existing workdir every draw must leave as
  it is), the base arguments, the fields of the config and a folder for new workdirs."""
  root = tmp_path_factory.mktemp("fuzz")
  code, err = _cli(f"--config={HINTON}:teacher,quick,source=digits", f"--workdir={root / 'teacher'}",
                   "--config.train.num_steps=2")
  assert code == 0, err
  base = [f"--config.teachers[0].init={root / 'teacher' / 'checkpoints'}", "--config.train.num_steps=2"]
  code, err = _cli(f"--config={SPEC}", f"--workdir={root / 'existing'}", *base)
  assert code == 0, err
  fields = _fields(SPEC, base)
  return {"root": root, "base": base, "fields": fields, "existing": root / "existing",
          "snapshot": tree_snapshot(root / "existing"), "count": itertools.count(), "outcomes": []}


def _fields(spec: str, overrides: list[str]) -> list[tuple[str, Any]]:
  config = kconfig.apply_overrides(kconfig.load(spec), overrides)
  return [(p, d) for p, d in _leaves(config) if p not in ("wandb_project",)]


def _one_line_error(code: int, err: str) -> bool:
  return code == 2 and err.startswith("kdlab: error: ") and err.count("\n") == 1


@st.composite
def _draws(draw, fields: list[tuple[str, Any]]) -> tuple[str, list[str]]:
  options = draw(st.lists(st.sampled_from(OPTIONS), max_size=2))
  spec = ",".join([SPEC, *options]) if options else SPEC
  chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f[0]))
  return spec, [f"--config.{path}={draw(_values(path, default))}" for path, default in chosen]


def test_every_draw_trains_or_is_refused_in_one_line_leaving_the_workdir_as_it_was(runs):
  @settings(max_examples=settings.default.max_examples * 3 // 5)
  @given(_draws(runs["fields"]))
  def check(drawn: tuple[str, list[str]]) -> None:
    spec, overrides = drawn
    args = [f"--config={spec}", *runs["base"], *overrides]
    code, err = _cli(f"--workdir={runs['existing']}", *args)
    assert code == 0 or _one_line_error(code, err), (code, err[-3000:])
    assert tree_snapshot(runs["existing"]) == runs["snapshot"], err
    outcome = "same run" if code == 0 else "refused"
    if "holds a run with a different config" in err:  # Valid as far as the workdir check: train it anew.
      workdir = runs["root"] / f"new{next(runs['count'])}"
      code, err = _cli(f"--workdir={workdir}", *args)
      # Trained; refused before writing; or (exit 1) stopped by the divergence check in one line.
      diverged = code == 1 and err.startswith("kdlab: error: ") and err.count("\n") == 1
      assert code == 0 or diverged or (_one_line_error(code, err) and not workdir.exists()), (code, err[-3000:])
      outcome = "trained" if code == 0 else "diverged" if diverged else "refused"
      if code == 0:
        assert (workdir / "summary.json").is_file()
      shutil.rmtree(workdir, ignore_errors=True)
    runs["outcomes"].append(outcome)
    event(outcome)  # --hypothesis-show-statistics: how the draws ended

  check()
  outcomes = runs["outcomes"]
  # The search reaches both sides: most draws are refused, some train (or rerun the finished run).
  assert outcomes.count("refused") > len(outcomes) // 2 and len(set(outcomes) - {"refused"}) >= 1, outcomes


# --- sweep files ----------------------------------------------------------------------------------

# Sweep files that are no sweep at all (each refused as a whole).
BROKEN_FILES = st.sampled_from(["def get_sweep(:\n", "def get_sweep():\n  return 1 / 0\n", "get_sweep = 3\n",
                                "def get_sweep():\n  return None\n", "import no_such_module_here\n", "x = 1\n"])
SEEDS = st.sampled_from([-1, 0, 1, 2, 2**32, 1.5, "0", True, None])
DISTRIBUTIONS = st.sampled_from(["uniform", "loguniform", "normal"])


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Any]:
  """A finished sweep (one run, the existing sweep workdir every draw must leave as it is), the base
  arguments and the fields of the config."""
  root = tmp_path_factory.mktemp("fuzz_sweeps")
  (root / "one.py").write_text("def get_sweep():\n  return {'seeds': [0]}\n")
  base = ["--config.train.num_steps=2"]
  code, out, err = _sweep_cli(root / "one.py", root / "existing", base)
  assert code == 0, out + err
  return {"root": root, "base": base, "fields": _fields(SWEEP_SPEC, base), "existing": root / "existing",
          "snapshot": tree_snapshot(root / "existing"), "count": itertools.count(), "outcomes": []}


def _sweep_cli(sweep_file: pathlib.Path, workdir: pathlib.Path, base: list[str]) -> tuple[int, str, str]:
  """``kdlab sweep`` in this process: its exit status, stdout and stderr."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    code = cli.main(["sweep", f"--config={SWEEP_SPEC}", f"--sweep={sweep_file}", f"--workdir={workdir}", *base,
                     "--no-wandb"])
  return code, out.getvalue(), err.getvalue()


@st.composite
def _sweep_files(draw, fields: list[tuple[str, Any]]) -> str:
  """The text of a sweep file: a dict of the sweep keys (and others), of at most 2 runs when valid."""
  if draw(st.integers(0, 9)) == 0:
    return draw(BROKEN_FILES)

  def entry(max_values: int) -> tuple[Any, list[Any]]:
    """A grid, list or random-space key (a field, two tied fields, or no field) and values for it."""
    (path, default), (other, other_default) = draw(st.sampled_from(fields)), draw(st.sampled_from(fields))
    shape = draw(st.sampled_from(["field", "field", "field", "tied", "junk"]))
    values = st.lists(_raw(path, default), min_size=0 if shape == "junk" else 1, max_size=max_values)
    if shape == "tied":
      return (path, other), draw(st.lists(st.tuples(_raw(path, default), _raw(other, other_default)),
                                          max_size=max_values))
    return (draw(st.one_of(NAMES, SIZES)) if shape == "junk" else path), draw(values)

  spec: dict[Any, Any] = {}
  seeds = draw(st.integers(0, 5))  # Mostly left out or valid: most draws should reach the settings.
  if seeds:
    spec["seeds"] = draw(st.one_of(st.lists(SEEDS, max_size=2), SEEDS)) if seeds == 1 else [seeds % 2]
  kind = draw(st.sampled_from(["seeds", "grid", "grid", "grid", "list", "list", "list", "random", "random",
                               "grid+list"]))
  if "grid" in kind:
    n = draw(st.sampled_from([1, 1, 1, 2, 2, 0]))
    spec["grid"] = dict(entry(2 if n == 1 else 1) for _ in range(n))
    if draw(st.integers(0, 9)) == 0 and spec["grid"]:  # Values that are no list.
      spec["grid"] = {key: draw(_scalars()) for key in spec["grid"]}
  if "list" in kind:
    spec["list"] = [{key: values[0] if values else None for key, values in (entry(1) for _ in range(draw(
        st.integers(0, 2))))} for _ in range(draw(st.sampled_from([1, 1, 2, 0])))]
  if kind == "random":
    key, values = entry(2)
    dist = draw(st.one_of(st.just(values), st.tuples(DISTRIBUTIONS, st.floats(-1, 1), st.floats(-1, 1))))
    spec["random"] = {"num_samples": draw(st.sampled_from([1, 2, 2, 0, -1])),
                      "seed": draw(st.sampled_from([0, 0, 0, -1, "x"])), "space": {key: dist}}
  if draw(st.integers(0, 7)) == 0:
    extra = draw(st.sampled_from(["name", "labels", "grids"]))
    spec[extra] = draw(st.one_of(NAMES, SIZES, st.dictionaries(st.sampled_from([f[0] for f in fields]), NAMES,
                                                               max_size=1)))
  return f"def get_sweep():\n  return {spec!r}\n"


def _sweep_failures(out: str) -> list[str]:
  return [line for line in out.splitlines() if ": FAILED: " in line]


def test_every_sweep_file_trains_or_is_refused_in_one_line_leaving_the_sweep_as_it_was(sweeps):
  @settings(max_examples=settings.default.max_examples // 3)
  @given(_sweep_files(sweeps["fields"]))
  def check(text: str) -> None:
    sweep_file = sweeps["root"] / f"sweep{next(sweeps['count'])}.py"
    sweep_file.write_text(text)
    new = sweeps["root"] / "new"
    code, out, err = _sweep_cli(sweep_file, new, sweeps["base"])
    if code == 2:  # Refused in a new workdir: so in the existing one, which it leaves as it was.
      assert _one_line_error(code, err) and not new.exists(), (code, err[-3000:])
      code, out, err = _sweep_cli(sweep_file, sweeps["existing"], sweeps["base"])
      assert _one_line_error(code, err), (code, err[-3000:])
      assert tree_snapshot(sweeps["existing"]) == sweeps["snapshot"], err
      outcome = "refused"
    else:  # Valid: every run trained, or stopped by the divergence check (exit 1, one line each).
      failures = _sweep_failures(out)
      assert code == 0 or (code == 1 and failures and all(": FAILED: Diverged: " in f for f in failures)), \
          (code, out[-3000:], err[-3000:])
      assert (new / "results.md").is_file()
      outcome = "trained" if code == 0 else "diverged"
      shutil.rmtree(new)
    sweeps["outcomes"].append(outcome)
    event(outcome)

  check()
  outcomes = sweeps["outcomes"]
  assert outcomes.count("refused") > len(outcomes) // 2 and "trained" in outcomes, outcomes
