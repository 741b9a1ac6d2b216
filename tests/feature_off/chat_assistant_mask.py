"""Assistant mask off: chat renders report no assistant spans (the mask is all False)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_hf_tokenizer.py::test_chat_ids_and_generation_masks_match_transformers",
          "tests/test_hf_tokenizer.py::test_plain_template_mask_is_each_assistant_content_and_its_end_token",
          "tests/test_hf_tokenizer.py::test_spans_follow_a_template_that_trims_content_and_generation_blocks_in_macros")


def disable() -> None:
  from kdlab.data import chat_template
  render = chat_template.render

  def no_spans(*args, **kwargs):
    text, _, from_blocks = render(*args, **kwargs)
    return text, [], from_blocks

  chat_template.render = no_spans


pytest_configure = plugin(__name__, disable)
