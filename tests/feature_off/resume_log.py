"""Metrics-log truncation off: on resume, ``metrics.jsonl`` keeps the lines the killed run logged after its
last checkpoint, so the resumed run logs those steps a second time."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_killed_run_resumes_only_the_remaining_steps_from_its_saved_state",
)


def disable() -> None:
  from kdlab.train import logging

  def __init__(self, workdir, resume_step):
    del resume_step
    self.path = workdir / "metrics.jsonl"

  logging.MetricsLog.__init__ = __init__


pytest_configure = plugin(__name__, disable)
