"""Runs every feature-off plugin's guarded tests with the plugin and fails unless they all fail.

``.venv/bin/python -m tests.feature_off.run [--jobs 2] [FEATURE ...]`` from the repository root
(``make check-tests``). A guard "fails" when pytest reports it failed or errored; one that passes, is
skipped or is not collected means the feature is not guarded, and the runner exits 1. Whether the
guards pass with the feature on is ``make test``'s job: they are ordinary tests of the suite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent


def features() -> list[str]:
  return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "run")


@dataclasses.dataclass
class Outcome:
  feature: str
  guards: tuple[str, ...]
  results: dict[str, str]  # test id -> "failed" | "error" | "passed" | "skipped"
  seconds: float
  log: str

  @property
  def ok(self) -> bool:
    return bool(self.results) and all(r in ("failed", "error") for r in self.results.values())


def _results(junit: pathlib.Path) -> dict[str, str]:
  results = {}
  if not junit.exists():
    return results
  for case in ET.parse(junit).getroot().iter("testcase"):
    name = f"{case.get('classname')}::{case.get('name')}"
    kinds = {child.tag for child in case}
    results[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                     else "skipped" if "skipped" in kinds else "passed")
  return results


def run_feature(feature: str) -> Outcome:
  module = importlib.import_module(f"tests.feature_off.{feature}")
  guards = tuple(module.GUARDS)
  start = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    junit = pathlib.Path(tmp) / "junit.xml"
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", f"tests.feature_off.{feature}", f"--junitxml={junit}", "-o", "junit_family=xunit1", *guards]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    results = _results(junit)
  missing = {g: "not collected" for g in guards if not any(_matches(g, r) for r in results)}
  return Outcome(feature, guards, {**results, **missing}, time.time() - start, proc.stdout[-4000:] + proc.stderr[-2000:])


def _matches(guard: str, result: str) -> bool:
  """Whether junit's ``tests.test_x.TestC::name[param]`` is the guard ``tests/test_x.py::...``."""
  path, _, name = guard.partition("::")
  module = path.removesuffix(".py").replace("/", ".")
  r_module, _, r_name = result.partition("::")
  return r_module.endswith(module.rsplit(".", 1)[-1]) and (not name or r_name.split("[")[0] == name.split("[")[0]
                                                           and ("[" not in name or r_name == name))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("features", nargs="*", help="only these (default: every module in tests/feature_off)")
  parser.add_argument("--jobs", type=int, default=2, help="plugins run at once (default 2)")
  args = parser.parse_args(argv)
  names = args.features or features()
  unknown = sorted(set(names) - set(features()))
  if unknown:
    print(f"kdlab: error: feature: unknown {', '.join(unknown)}; choose from {', '.join(features())}", file=sys.stderr)
    return 2
  start = time.time()
  outcomes = []
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for outcome in pool.map(run_feature, names):
      outcomes.append(outcome)
      verdict = "guarded" if outcome.ok else "NOT GUARDED"
      print(f"{outcome.feature:28s} {verdict:12s} {outcome.seconds:6.1f} s", flush=True)
      for test, result in sorted(outcome.results.items()):
        print(f"    {result:13s} {test}")
      if not outcome.ok:
        print("    --- pytest output (tail) ---\n" + "\n".join("    " + l for l in outcome.log.splitlines()[-40:]))
  failed = sum(not o.ok for o in outcomes)
  print(f"{time.time() - start:.0f} s for {len(outcomes)} features")
  print(f"features: {len(outcomes) - failed} passed, {failed} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
