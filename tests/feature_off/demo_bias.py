"""make demo's bias correction off: ``evaluate_run`` ignores ``logit_offset`` (the +3.5 on class 3 is lost)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_demo.py::test_demo_omit3_runs_drop_the_3s_and_the_bias_run_raises_class_3_by_3_5",
)


def disable() -> None:
  from kdlab.train import evaluate
  evaluate_run = evaluate.evaluate_run
  evaluate.evaluate_run = lambda workdir, *, logit_offset=None: evaluate_run(workdir)


pytest_configure = plugin(__name__, disable)
