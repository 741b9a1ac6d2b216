"""Cross-tokenizer chunk filtering off: every aligned chunk is kept, whether or not all its tokens are
counted targets on both sides (cut by teacher_seq_len, outside the loss mask)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_xtok_data.py::test_teacher_truncation_drops_cut_chunks_and_long_teacher_prompts_are_refused",
    "tests/test_xtok_data.py::test_chats_rendered_by_two_chat_templates_align_turn_by_turn[generation-last_turn]",
)


def disable() -> None:
  import numpy as np
  from kdlab.data import alignment

  def keep_all(s_chunk, s_mask, t_chunk, t_mask):
    out = []
    for chunk, mask in ((s_chunk, s_mask), (t_chunk, t_mask)):
      ids = np.full(len(mask), -1, np.int32)
      m = min(len(mask), len(chunk) - 1)
      ids[:m] = chunk[1:m + 1]
      out.append(ids)
    return out[0], out[1]

  alignment.chunk_targets = keep_all


pytest_configure = plugin(__name__, disable)
