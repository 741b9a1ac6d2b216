"""Chunk alignment off: the i-th token group of the student is paired with the teacher's i-th, whatever
text each covers (ids, lengths and shapes as before)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_cross_tokenizer.py::test_chunks_hold_the_same_text_on_both_sides_and_cover_the_completion",
    "tests/test_cross_tokenizer.py::test_chunk_ids_of_split_characters_gaps_and_two_spans",
    "tests/test_cross_tokenizer.py::test_align_arrays_follow_the_targets",
)


def disable() -> None:
  import numpy as np
  from kdlab.data import alignment

  def by_index(s, t):
    n = min(len(s), len(t))
    return (np.where(np.arange(len(s)) < n, np.arange(len(s)), -1),
            np.where(np.arange(len(t)) < n, np.arange(len(t)), -1))

  alignment._match = by_index


pytest_configure = plugin(__name__, disable)
