"""Gradient clipping off: ``config.optimizer.clip_grad_norm`` is ignored by ``optim.make``."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_optim.py::test_clip_grad_norm_scales_the_update_and_logs_the_norm_before_clipping",
          "tests/test_optim.py::test_optimizer_by_name_is_that_optax_optimizer_with_the_schedule[sgd-clip]")


def disable() -> None:
  from kdlab.train import optim
  make = optim.make

  def unclipped(cfg, *args, **kwargs):
    return make({k: v for k, v in dict(cfg).items() if k != "clip_grad_norm"}, *args, **kwargs)

  optim.make = unclipped


pytest_configure = plugin(__name__, disable)
