"""On-policy off: lambda is ignored in the batches (the rollout returns the data batch; the
``on_policy/fraction`` metric still says the steps were on-policy)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_on_policy.py::test_lambda_one_trains_on_the_students_samples_and_logs_the_generation_share",)


def disable() -> None:
  from kdlab.train import on_policy
  on_policy.rollout = lambda graphdef, params, rest, batch, key, *, spec: batch


pytest_configure = plugin(__name__, disable)
