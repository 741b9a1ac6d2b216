"""CRD memory bank off: ``losses.crd`` returns its bank rows unchanged (the loss and Z as before)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_terms.py::test_crd_memory_bank_moves_in_training",)


def disable() -> None:
  from kdlab import losses
  crd = losses.crd

  def frozen_bank(s_embed, t_embed, indices, state, **kwargs):
    loss, new = crd(s_embed, t_embed, indices, state, **kwargs)
    return loss, new._replace(memory_s=state.memory_s, memory_t=state.memory_t)

  losses.crd = frozen_bank


pytest_configure = plugin(__name__, disable)
