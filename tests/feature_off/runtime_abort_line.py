"""The runtime-abort filter off: a lost process ends the others with the runtime's C++ stack trace."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_multihost.py::test_kill_9_of_one_process_stops_the_other_within_the_timeout_with_one_line",
)


def disable() -> None:
  from kdlab import distributed
  distributed._filter_stderr = lambda process, count: None


pytest_configure = plugin(__name__, disable)
