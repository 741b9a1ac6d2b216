"""W&B group and tags off: runs reach W&B without the sweep's group and tags."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_wandb.py::test_wandb_run_gets_the_sweeps_group_and_tags",
)


def disable() -> None:
  from kdlab.train import logging as klog
  init = klog.WandbLog.__init__

  def init_ungrouped(self, workdir, config, *, group=None, tags=(), **kwargs):
    init(self, workdir, config, **kwargs)

  klog.WandbLog.__init__ = init_ungrouped


pytest_configure = plugin(__name__, disable)
