"""Disk full off: a write that finds the disk full ends in orbax's and Python's tracebacks."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_faults.py::test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space",
)


def disable() -> None:
  from kdlab.train import checkpoint, stopping
  stopping.disk_full = lambda e: None
  checkpoint.orbax_errors_silenced = __import__("contextlib").nullcontext


pytest_configure = plugin(__name__, disable)
