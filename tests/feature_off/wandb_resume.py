"""W&B resume off: every start of a run gets a new W&B run id (the saved ``wandb_id`` is forgotten)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_wandb.py::test_wandb_restart_continues_the_same_run_id_after_the_checkpoint",
)


def disable() -> None:
  from kdlab.train import logging as klog
  init = klog.WandbLog.__init__

  def init_with_a_new_id(self, workdir, *args, **kwargs):
    (workdir / "wandb_id").unlink(missing_ok=True)
    init(self, workdir, *args, **kwargs)

  klog.WandbLog.__init__ = init_with_a_new_id


pytest_configure = plugin(__name__, disable)
