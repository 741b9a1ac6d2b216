"""Segment masking off: the decoders' packed-row mask ignores ``segment_ids`` (plain causal attention
over the whole row, the sliding window still measured in ``positions``)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_packing_model.py::test_packed_forward_equals_each_example_alone[llama]",
    "tests/test_packing_model.py::test_packed_forward_equals_each_example_alone[gemma3]",
    "tests/test_packing_model.py::test_packed_forward_equals_each_example_alone[gpt]",
    "tests/test_packing_model.py::test_attention_probabilities_stay_inside_each_segment[gpt]",
)


def disable() -> None:
  import jax.numpy as jnp
  from kdlab.models import decoders, gpt, packing
  visible = packing.segment_visible

  def one_segment(segment_ids, positions, window):
    return visible(jnp.zeros_like(segment_ids), positions, window)

  decoders.segment_visible = gpt.segment_visible = one_segment


pytest_configure = plugin(__name__, disable)
