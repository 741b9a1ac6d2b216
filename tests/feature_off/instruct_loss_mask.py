"""Instruction loss masks off: every token of every example counts, whatever config.data.loss_mask says."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_instruct_data.py::test_prompt_completion_and_text_records_with_bytes",
          "tests/test_instruct_data.py::test_chat_ids_and_assistant_masks_match_transformers",
          "tests/test_instruct_data.py::test_loss_mask_modes")


def disable() -> None:
  from kdlab.data import instruct
  encode = instruct.Encoder.encode

  def everything(self, record):
    ids, counted = encode(self, record)
    return ids, counted | True

  instruct.Encoder.encode = everything


pytest_configure = plugin(__name__, disable)
