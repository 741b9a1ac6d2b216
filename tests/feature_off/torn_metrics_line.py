"""Torn-line tolerance off: every line of ``metrics.jsonl`` must parse, so the last line a crash or a full
disk cut short makes the run impossible to resume (and its readers fail)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_faults.py::test_damaged_checkpoints_are_moved_aside_and_the_newest_that_loads_resumes",)


def disable() -> None:
  import json
  from kdlab.train import logging
  logging._lines = lambda path: [(t, json.loads(t)) for t in path.read_text().splitlines() if t.strip()]


pytest_configure = plugin(__name__, disable)
