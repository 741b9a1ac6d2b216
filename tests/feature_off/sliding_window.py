"""Sliding windows off: the pretrained decoders' sliding-window layers attend to every earlier position."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_pretrained_models.py::test_logits_match_transformers[qwen2]",
    "tests/test_pretrained_models.py::test_logits_match_transformers[gemma3]",
    "tests/test_pretrained_models.py::test_attention_taps_follow_the_sliding_window",
)


def disable() -> None:
  from kdlab.models import decoders
  visible = decoders.visible
  decoders.visible = lambda q_positions, k_positions, window: visible(q_positions, k_positions, None)


pytest_configure = plugin(__name__, disable)
