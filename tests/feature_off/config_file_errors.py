"""Config file errors off: a config file is executed and its ``get_config`` called as they are, so a syntax
error, a failed import, a ``get_config`` returning None or raising end in a traceback."""

from tests.feature_off._switch import plugin

_CASE = "tests/test_validation.py::test_a_config_file_that_fails_is_one_line_naming_it"
GUARDS = (
    *(f"{_CASE}[{case}]" for case in ("syntax", "import", "none", "raises")),
    "tests/test_validation.py::test_a_sweep_file_that_fails_is_one_line_naming_it[syntax]",
    "tests/test_validation.py::test_a_config_file_with_a_syntax_error_is_one_line_from_the_real_command",
)


def disable() -> None:
  import importlib.util
  import pathlib
  import sys
  from kdlab import config

  def load_python_file(file, prefix, field="--config"):
    del field
    spec = importlib.util.spec_from_file_location(f"{prefix}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent.absolute()))
    try:
      spec.loader.exec_module(module)
    finally:
      sys.path.remove(str(file.parent.absolute()))
    return module

  def load(spec):
    path, _, arg = spec.partition(":")
    module = load_python_file(pathlib.Path(path), "kdlab_config")
    return config.with_optional_fields(module.get_config(arg or None))

  config.load_python_file = load_python_file
  config.load = load


pytest_configure = plugin(__name__, disable)
