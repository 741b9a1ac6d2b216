"""W&B logging off: ``WandbLog.write`` drops the evaluation metrics (the run still logs training lines)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_wandb.py::test_wandb_history_holds_the_metrics_of_metrics_jsonl",
)


def disable() -> None:
  from kdlab.train import logging as klog
  write = klog.WandbLog.write
  klog.WandbLog.write = lambda self, step, metrics: write(
      self, step, {k: v for k, v in metrics.items() if not k.startswith("test/")})


pytest_configure = plugin(__name__, disable)
