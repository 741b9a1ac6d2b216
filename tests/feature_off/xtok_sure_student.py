"""The straight-through clamp of chunk probabilities off: a plain clamp, so a student sure of a chunk
(P = 1) gets no gradient from the binary KL however unsure the teacher is."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_cross_tokenizer.py::test_binary_kl_is_finite_for_a_sure_student",)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.losses import cross_tokenizer

  cross_tokenizer._below_one = lambda log_p: jnp.minimum(log_p, -cross_tokenizer._EPS)


pytest_configure = plugin(__name__, disable)
