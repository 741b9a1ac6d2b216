"""Rematerialization off in the pretrained decoders: ``remat="full"``/``"dots"`` keep every activation."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_pretrained_models.py::test_remat_checkpoints_each_block_and_keeps_gradients",)


def disable() -> None:
  from kdlab.models import decoders
  decoders._rematted = lambda run, remat: run


pytest_configure = plugin(__name__, disable)
