"""Strided microbatches off: microbatch ``j`` is the ``j``-th contiguous block of the batch (the same
examples in other groups: the accumulated update is unchanged), which leaves each microbatch on a
few of the devices the batch is split over."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_accumulation.py::test_sharded_batch_microbatches_stay_split_over_the_devices",
          "tests/test_accumulation.py::test_split_microbatches_is_strided_and_keeps_every_row")


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.train import step

  def contiguous(batch, k):
    return {name: jnp.asarray(x).reshape(k, jnp.shape(x)[0] // k, *jnp.shape(x)[1:]) for name, x in batch.items()}

  step.split_microbatches = contiguous


pytest_configure = plugin(__name__, disable)
