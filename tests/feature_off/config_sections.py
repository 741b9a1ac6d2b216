"""Section type checks off: an optional section (``born_again``, ``ema_teacher``, ...) set to a number or a
string is accepted, and training crashes reading its fields."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_validation.py::test_bad_values_are_refused_in_one_line_before_anything_is_written[section]",)


def disable() -> None:
  from kdlab import config
  config.SECTIONS.clear()


pytest_configure = plugin(__name__, disable)
