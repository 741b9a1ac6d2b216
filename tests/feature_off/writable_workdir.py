"""Workdir check off: a workdir that is a file (or lies under one) is not refused up front; training gets
as far as writing it and crashes there."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_validation.py::test_a_workdir_that_is_a_file_or_under_one_is_refused",)


def disable() -> None:
  from kdlab.train import prepare
  prepare.check_writable_dir = lambda path, flag="--workdir": None


pytest_configure = plugin(__name__, disable)
