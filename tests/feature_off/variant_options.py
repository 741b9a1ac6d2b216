"""Variant option checks off: ``configs/common.py``'s ``parse_arg`` accepts any option name, so a misspelled
option (``epoch=3``) trains as if it were not there."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_validation.py::test_every_config_file_refuses_a_misspelled_option",
    "tests/test_validation.py::test_a_misspelled_option_lists_the_allowed_ones",
)


def disable() -> None:
  import importlib.util
  import pathlib
  import sys
  # Config files import ``common`` from configs/; a module already in sys.modules is the one they get.
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "common.py"
  spec = importlib.util.spec_from_file_location("common", path)
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  checked = common.parse_arg

  def parse_arg(arg, variants, default, *, options):
    given = [p.partition("=")[0] for p in (arg or default).split(",")[1:] if p]
    return checked(arg, variants, default, options=[*options, *given])

  common.parse_arg = parse_arg
  sys.modules["common"] = common


pytest_configure = plugin(__name__, disable)
