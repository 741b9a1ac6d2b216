"""Data iterator state off: a resumed run's grain iterator ignores the saved position and starts from the
first batch again (``set_state`` does nothing), though the checkpoint still stores it."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_train.py::test_killed_run_resumes_only_the_remaining_steps_from_its_saved_state",
)


def disable() -> None:
  from grain._src.python.dataset.transformations.prefetch import PrefetchDatasetIterator
  PrefetchDatasetIterator.set_state = lambda self, state: None


pytest_configure = plugin(__name__, disable)
