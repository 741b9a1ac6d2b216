"""Optimizer keyword arguments off: ``config.optimizer.kwargs`` is ignored (optax's defaults)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_optim.py::test_config_dict_kwargs_are_passed_through",
          "tests/test_optim.py::test_optimizer_by_name_is_that_optax_optimizer_with_the_schedule[lion]",
          "tests/test_optim.py::test_optimizer_by_name_is_that_optax_optimizer_with_the_schedule[adamw-kwargs]")


def disable() -> None:
  from kdlab.train import optim
  make = optim.make

  def without_kwargs(cfg, *args, **kwargs):
    return make({k: v for k, v in dict(cfg).items() if k != "kwargs"}, *args, **kwargs)

  optim.make = without_kwargs


pytest_configure = plugin(__name__, disable)
