"""W&B offline by default off: with ``WANDB_MODE`` unset, W&B logging is disabled."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_wandb.py::test_wandb_is_offline_by_default_under_the_workdir",
)


def disable() -> None:
  import os
  from kdlab.train import logging as klog
  init = klog.WandbLog.__init__

  def init_disabled_by_default(self, *args, **kwargs):
    unset = "WANDB_MODE" not in os.environ
    if unset:
      os.environ["WANDB_MODE"] = "disabled"
    try:
      init(self, *args, **kwargs)
    finally:
      if unset:
        del os.environ["WANDB_MODE"]

  klog.WandbLog.__init__ = init_disabled_by_default


pytest_configure = plugin(__name__, disable)
