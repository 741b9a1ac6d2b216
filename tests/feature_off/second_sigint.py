"""A second SIGINT ignored: once a run is stopping, Ctrl-C no longer exits at once; it waits for the
checkpoint being written (as a second SIGTERM does)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_interrupt.py::test_second_sigint_exits_at_once_and_leaves_the_previous_checkpoint_latest",
)


def disable() -> None:
  from kdlab.train import stopping

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signum

  stopping.Deferred._handle = _handle


pytest_configure = plugin(__name__, disable)
