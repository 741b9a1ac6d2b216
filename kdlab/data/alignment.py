"""Two tokenizations of the same text, and the chunks where their token boundaries coincide.

Cross-tokenizer distillation (:mod:`kdlab.losses.cross_tokenizer`) runs the teacher on the text
tokenized its own way and compares the two models over the same characters. This module does the
host-side part: each side's tokens with their character spans (``offsets``, from the ``tokenizers``
backend), and a chunk id per token such that chunk ``c`` covers exactly the same characters of the
completion in both tokenizations.

**Spans.** Each side gives its text and its completion spans: character ranges ``[start, end)`` of
that text, the i-th span of the student's text holding the same characters as the i-th span of the
teacher's (the assistant turns of two chat templates, or the completion of one shared text). The
spans, concatenated, are the *content*; tokens are placed in content coordinates. A token counts
when it lies entirely inside one span and covers at least one character (not a ``[bos]`` added
around the text, nor a token reaching across a span's edge).

**Chunks.** On each side, tokens whose character ranges overlap (a multi-byte character split over
several byte-level tokens) form one group. Chunks are the shortest runs of consecutive groups, on
both sides, that start at the same content position, cover it without a gap, and end at the same
position: every place where both tokenizations have a boundary ends a chunk. Characters not
covered by counted tokens on a side, and the groups around them, are left out of every chunk.

**Batch arrays** (:func:`align`), both sides laid out as :mod:`kdlab.data.text` does: a window of
``length + 1`` tokens gives ``tokens = window[:-1]`` and ``targets = window[1:]``; position ``l``
predicts ``targets[l]``, and the chunk id, mask and weight of position ``l`` are those of token
``l + 1``. A chunk is kept only when every one of its tokens is a target in both windows (the first
token of a text, which no position predicts, and tokens cut off by ``length`` drop their chunks);
kept chunks are renumbered ``0, 1, ...`` in text order.

**Rows of instruction data** (:func:`chunk_targets`, used by :mod:`kdlab.data.instruct`): each side's
example is laid out as :mod:`kdlab.data.packing` lays it (``n`` tokens, targets ``1 .. n - 1``, a loss
mask on target positions); a chunk is kept only when every one of its tokens, on both sides, is a
target there with mask 1. Two renderings of one record (two chat templates) are paired turn by turn
by :func:`pair_spans`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kdlab.data.hf_tokenizer import HFTokenizer

Spans = Sequence[tuple[int, int]]


def encode(tokenizer: HFTokenizer, text: str, *, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``text`` -> (int32 ``[n]`` ids, int64 ``[n, 2]`` character offsets ``[start, end)``).

  Tokens the post-processor adds (a BOS) have empty offsets; byte-level tokens that split one
  character each carry that character's range.
  """
  enc = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
  return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)


def _content_positions(offsets: np.ndarray, spans: Spans) -> np.ndarray:
  """``[n, 2]`` offsets -> ``[n, 2]`` content coordinates; -1 rows for tokens that do not count."""
  out = np.full(offsets.shape, -1, np.int64)
  base = 0
  for start, end in spans:
    inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    out[inside] = offsets[inside] - start + base
    base += end - start
  return out


def _groups(pos: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Counted tokens -> (group of each token, -1 if none; ``[(start, end)]`` per group in order)."""
  group = np.full(len(pos), -1, np.int64)
  spans: list[tuple[int, int]] = []
  for k in np.flatnonzero(pos[:, 0] >= 0):
    start, end = int(pos[k, 0]), int(pos[k, 1])
    if spans and start < spans[-1][1]:  # overlaps the previous group (a split character)
      spans[-1] = (spans[-1][0], max(spans[-1][1], end))
    else:
      spans.append((start, end))
    group[k] = len(spans) - 1
  return group, spans


def _match(s: list[tuple[int, int]], t: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Group spans of both sides -> chunk id of each group (-1: in no chunk)."""
  s_chunk, t_chunk = np.full(len(s), -1, np.int64), np.full(len(t), -1, np.int64)
  i = j = 0
  num = 0
  while i < len(s) and j < len(t):
    if s[i][0] != t[j][0]:  # no common start here: skip the side that is behind
      if s[i][0] < t[j][0]:
        i += 1
      else:
        j += 1
      continue
    i1, j1 = i, j
    while s[i1][1] != t[j1][1]:  # extend the side that ends first, while it stays contiguous
      if s[i1][1] < t[j1][1]:
        if i1 + 1 == len(s) or s[i1 + 1][0] != s[i1][1]:
          break
        i1 += 1
      else:
        if j1 + 1 == len(t) or t[j1 + 1][0] != t[j1][1]:
          break
        j1 += 1
    if s[i1][1] == t[j1][1]:
      s_chunk[i:i1 + 1], t_chunk[j:j1 + 1] = num, num
      num += 1
    i, j = i1 + 1, j1 + 1
  return s_chunk, t_chunk


def pair_spans(s_text: str, s_spans: Sequence[tuple[int, int] | None], t_text: str,
               t_spans: Sequence[tuple[int, int] | None]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """The i-th spans of two texts made to hold the same characters (for :func:`chunk_ids`).

  ``s_spans[i]`` and ``t_spans[i]`` locate the same piece of content (an assistant turn, a
  completion) in each text, or are None where a side does not render it. Equal pieces are kept;
  where one holds the other (a template that trims the content) the longer is narrowed to the
  shorter's first occurrence in it; other pairs, and empty ones, are left out.

  Returns:
    ``(s_spans, t_spans)``, equally long, the i-th of each holding the same characters.
  """
  if len(s_spans) != len(t_spans):
    raise ValueError(f"s_spans and t_spans: {len(s_spans)} and {len(t_spans)} spans; give one per piece on each side")
  s_out, t_out = [], []
  for s, t in zip(s_spans, t_spans):
    if s is None or t is None:
      continue
    a, b = s_text[s[0]:s[1]], t_text[t[0]:t[1]]
    if not a or not b:
      continue
    if a != b and b in a:
      s = (s[0] + a.find(b), s[0] + a.find(b) + len(b))
    elif a != b and a in b:
      t = (t[0] + b.find(a), t[0] + b.find(a) + len(a))
    elif a != b:
      continue
    s_out.append(s)
    t_out.append(t)
  return s_out, t_out


def _check_spans(name: str, spans: Spans, text_len: int | None) -> None:
  last = 0
  for start, end in spans:
    if not 0 <= last <= start <= end or (text_len is not None and end > text_len):
      raise ValueError(f"{name}: spans must be ordered, disjoint [start, end) ranges inside the text, "
                       f"got {list(spans)}")
    last = end


def chunk_ids(s_offsets: np.ndarray, s_spans: Spans, t_offsets: np.ndarray, t_spans: Spans
              ) -> tuple[np.ndarray, np.ndarray]:
  """The chunk of each token of two tokenizations of the same content (module doc).

  Args:
    s_offsets: ``[n_s, 2]`` character offsets of the student's tokens in its text.
    s_spans: the student text's content spans ``[(start, end), ...]``.
    t_offsets: ``[n_t, 2]`` offsets of the teacher's tokens in its text.
    t_spans: the teacher text's spans, the i-th as long as (and equal in text to) the student's i-th.

  Returns:
    int32 ``[n_s]`` and ``[n_t]`` chunk ids (``0 .. n - 1`` in text order; -1: in no chunk).
  """
  _check_spans("s_spans", s_spans, None)
  _check_spans("t_spans", t_spans, None)
  s_lens, t_lens = [e - s for s, e in s_spans], [e - s for s, e in t_spans]
  if s_lens != t_lens:
    raise ValueError(f"s_spans and t_spans: the i-th spans must hold the same text, got lengths {s_lens} and {t_lens}")
  s_group, s_groups = _groups(_content_positions(np.asarray(s_offsets).reshape(-1, 2), s_spans))
  t_group, t_groups = _groups(_content_positions(np.asarray(t_offsets).reshape(-1, 2), t_spans))
  s_chunk, t_chunk = _match(s_groups, t_groups)
  s_ids = np.where(s_group >= 0, s_chunk[np.maximum(s_group, 0)] if len(s_chunk) else -1, -1)
  t_ids = np.where(t_group >= 0, t_chunk[np.maximum(t_group, 0)] if len(t_chunk) else -1, -1)
  return s_ids.astype(np.int32), t_ids.astype(np.int32)


def _renumber(sides: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[int, int]:
  """``[(chunk of each token, whether the token may be in a kept chunk), ...]`` -> ``{old id: new id}``
  for the chunks all of whose tokens may be, on every side, renumbered ``0, 1, ...`` in order."""
  lost, found = set(), set()
  for chunk, ok in sides:
    found |= set(np.unique(chunk[chunk >= 0]).tolist())
    lost |= set(np.unique(chunk[~ok & (chunk >= 0)]).tolist())
  return {c: i for i, c in enumerate(sorted(found - lost))}


def chunk_targets(s_chunk: np.ndarray, s_mask: np.ndarray, t_chunk: np.ndarray, t_mask: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Chunk ids of two examples (per token) -> chunk ids on their target positions (module doc, "Rows").

  Args:
    s_chunk: int ``[n_s]`` chunk of each token of the student's whole example (:func:`chunk_ids`).
    s_mask: float ``[m_s]`` the example's loss mask on target positions after any cut to the row
      (``m_s <= n_s``): position ``l`` predicts token ``l + 1`` and counts when ``s_mask[l] > 0``.
    t_chunk, t_mask: the same for the teacher.

  Returns:
    int32 ``[m_s]`` and ``[m_t]``: the chunk of the token each position predicts (``0 .. k - 1`` in
    text order over the chunks kept on both sides), -1 where none.
  """
  sides = []
  for chunk, mask in ((s_chunk, s_mask), (t_chunk, t_mask)):
    chunk, mask = np.asarray(chunk), np.asarray(mask)
    if len(mask) > len(chunk):
      raise ValueError(f"mask: {len(mask)} target positions for {len(chunk)} tokens; give at most one per token")
    ok = np.zeros(len(chunk), bool)
    ok[1:len(mask) + 1] = mask[:len(chunk) - 1] > 0  # token k is the target of position k - 1
    sides.append((chunk, ok))
  renumber = _renumber(sides)
  out = []
  for (chunk, _), mask in zip(sides, (s_mask, t_mask)):
    ids = np.full(len(mask), -1, np.int32)
    m = min(len(mask), len(chunk) - 1)
    ids[:m] = [renumber.get(int(c), -1) for c in chunk[1:m + 1]]
    out.append(ids)
  return out[0], out[1]


def _in_spans(offsets: np.ndarray, spans: Spans) -> np.ndarray:
  """Tokens overlapping any span (the completion's tokens, as chat assistant masks count them)."""
  mask = np.zeros(len(offsets), bool)
  for start, end in spans:
    mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
  return mask


def _window(ids: np.ndarray, values: np.ndarray, length: int, pad: int, fill) -> tuple[np.ndarray, np.ndarray]:
  """Per-token ``values`` of a window of ``length + 1`` tokens -> (``[length]`` inputs, ``[length]`` target values)."""
  n = min(len(ids), length + 1)
  tokens = np.full(length, pad, np.int32)
  tokens[:max(n - 1, 0)] = ids[:max(n - 1, 0)]
  target_values = np.full(length, fill, values.dtype)
  target_values[:max(n - 1, 0)] = values[1:n]
  return tokens, target_values


def _pad_id(tokenizer: HFTokenizer) -> int:
  for value in (tokenizer.pad_id, tokenizer.eos_id):
    if value is not None:
      return value
  return 0


def align(s_text: str, s_spans: Spans, student: HFTokenizer, t_text: str, t_spans: Spans, teacher: HFTokenizer, *,
          student_len: int, teacher_len: int) -> dict[str, np.ndarray]:
  """One example, tokenized by both sides, as fixed-length arrays (module doc, "Batch arrays").

  Args:
    s_text, s_spans: the student's text and its completion spans.
    student: the student's tokenizer.
    t_text, t_spans: the teacher's text (the same, or its own chat template's rendering) and spans,
      the i-th holding the same characters as the student's i-th.
    teacher: the teacher's tokenizer.
    student_len, teacher_len: the sequence lengths ``L_s``, ``L_t``.

  Returns:
    ``tokens``, ``targets`` int32 ``[L_s]``, ``token_mask`` float32 ``[L_s]`` (targets overlapping a
    span), ``student_chunks`` int32 ``[L_s]``; ``teacher_tokens``, ``teacher_targets``,
    ``teacher_token_mask``, ``teacher_chunks`` likewise ``[L_t]``. Padding targets have mask 0 and
    chunk -1.
  """
  _check_spans("s_spans", s_spans, len(s_text))
  _check_spans("t_spans", t_spans, len(t_text))
  if len(s_spans) != len(t_spans) or any(s_text[a:b] != t_text[c:d] for (a, b), (c, d) in zip(s_spans, t_spans)):
    raise ValueError("s_spans and t_spans: the i-th spans of the two texts must hold the same characters")
  s_ids, s_off = encode(student, s_text)
  t_ids, t_off = encode(teacher, t_text)
  s_chunk, t_chunk = chunk_ids(s_off, s_spans, t_off, t_spans)
  # A chunk counts only if all its tokens are targets in both windows (tokens 1 .. length).
  sides = []
  for chunk, length in ((s_chunk, student_len), (t_chunk, teacher_len)):
    ok = np.zeros(len(chunk), bool)
    ok[1:length + 1] = True
    sides.append((chunk, ok))
  renumber = _renumber(sides)

  def relabel(chunk: np.ndarray) -> np.ndarray:
    return np.asarray([renumber.get(int(c), -1) for c in chunk], np.int32)

  out = {}
  for prefix, ids, off, spans, chunk, length, tok in (
      ("", s_ids, s_off, s_spans, s_chunk, student_len, student),
      ("teacher_", t_ids, t_off, t_spans, t_chunk, teacher_len, teacher)):
    pad = _pad_id(tok)
    tokens, targets = _window(ids, ids, length, pad, pad)
    _, mask = _window(ids, _in_spans(off, spans).astype(np.float32), length, pad, 0.0)
    _, chunks = _window(ids, relabel(chunk), length, pad, -1)
    out |= {f"{prefix}tokens": tokens, f"{prefix}targets": targets, f"{prefix}token_mask": mask}
    out["student_chunks" if not prefix else "teacher_chunks"] = chunks
  return out


def align_completion(prompt: str, completion: str, student: HFTokenizer, teacher: HFTokenizer, *,
                     student_len: int, teacher_len: int) -> dict[str, np.ndarray]:
  """:func:`align` of the text ``prompt + completion`` on both sides, the completion as the one span."""
  text = prompt + completion
  span = [(len(prompt), len(text))]
  return align(text, span, student, text, span, teacher, student_len=student_len, teacher_len=teacher_len)
