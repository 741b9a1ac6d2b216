"""Sweep file ARG off: ``--sweep=FILE:ARG`` calls ``get_sweep()`` without its argument."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_sweep.py::test_sweep_file_arg_reaches_get_sweep",)


def disable() -> None:
  from kdlab import sweep
  load_sweep_file = sweep.load_sweep_file
  sweep.load_sweep_file = lambda spec: load_sweep_file(spec.partition(":")[0])


pytest_configure = plugin(__name__, disable)
