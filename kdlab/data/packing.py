"""Whole examples into fixed-length rows: greedy first-fit packing with segment ids and positions.

An example is ``tokens`` int32 ``[n]`` with a loss ``mask`` float32 ``[n]`` on its target positions:
``mask[t]`` weighs predicting ``tokens[t + 1]`` from ``tokens[:t + 1]``, and ``mask[n - 1] = 0`` (the
last token's next token is not part of the example). Every example must fit a row (``n <= L``).

:func:`pack` places the examples in their order, each into the first row (lowest index) with room
for all of it, opening a new row when none has (greedy first-fit: deterministic, O(log rows) per
example, and an example's row never depends on later examples). ``packing=False`` gives every example a row of its own. Inside a row the examples keep
their order (ids increase along the row). Each row holds:

* ``tokens`` int32 ``[L]``: the examples' tokens one after the other, then ``pad_id``;
* ``targets`` int32 ``[L]``: the next token *of the same example* (``pad_id`` at each example's
  last token and on padding), so no target crosses from one example into the next;
* ``mask`` float32 ``[L]``: the examples' masks (0 at each example's last token and on padding);
* ``segment_ids`` int32 ``[L]``: 1, 2, 3, ... for the row's first, second, ... example, 0 on padding;
* ``positions`` int32 ``[L]``: 0, 1, 2, ... restarting at each example's first token, 0 on padding.

``extra`` values (per example, on target positions as the mask is) are laid out as the mask is,
under their own names, with their own fill on padding and at each example's last token (the chunk
ids of cross-tokenizer rows, :mod:`kdlab.data.alignment`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Packed examples: the ``[N, L]`` row arrays of the module doc and where each example lies.

  Attributes:
    tokens, targets, segment_ids, positions: int32 ``[N, L]``.
    mask: float32 ``[N, L]``.
    example_row, example_start, example_length: int32 ``[E]``: example ``e`` is
      ``tokens[example_row[e], example_start[e]:example_start[e] + example_length[e]]``.
    extra: more ``[N, ...]`` row arrays, each carried into batches under its name (the teacher's
      tokenization of cross-tokenizer rows: ``teacher_tokens``, ..., :mod:`kdlab.data.instruct`).
  """

  tokens: np.ndarray
  targets: np.ndarray
  mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  example_row: np.ndarray
  example_start: np.ndarray
  example_length: np.ndarray
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[i], "targets": self.targets[i], "mask": self.mask[i],
            "segment_ids": self.segment_ids[i], "positions": self.positions[i],
            **{k: v[i] for k, v in self.extra.items()}}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return (self[i] for i in range(len(self)))

  @property
  def num_tokens(self) -> int:
    """Counted (mask 1) target tokens."""
    return int(self.mask.sum())

  def row_examples(self, i: int) -> np.ndarray:
    """int64 ``[k]``: the ids of the examples in row ``i``, in row order (segment ``j + 1`` is the j-th)."""
    ids = np.flatnonzero(self.example_row == i)
    return ids[np.argsort(self.example_start[ids], kind="stable")]


def _first_fit(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows and start offsets of examples of ``lengths`` under greedy first-fit into rows of ``seq_len``."""
  size = 1 << max(0, (len(lengths) - 1).bit_length())
  tree = np.full(2 * size, seq_len, np.int64)  # free tokens; rows not yet opened are empty
  rows = np.zeros(len(lengths), np.int32)
  starts = np.zeros(len(lengths), np.int32)
  for e, n in enumerate(lengths):
    node = 1
    while node < size:  # descend to the leftmost leaf with room
      node = 2 * node if tree[2 * node] >= n else 2 * node + 1
    free = int(tree[node])
    rows[e], starts[e] = node - size, seq_len - free
    tree[node] = free - n
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
  return rows, starts


def pack(tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray], seq_len: int, *, pad_id: int,
         packing: bool = True, extra: Mapping[str, tuple[Sequence[np.ndarray], Any]] | None = None) -> PackedRows:
  """Packs examples (``tokens[e]`` int ``[n_e]``, ``masks[e]`` float ``[n_e]``) into ``[N, seq_len]`` rows.

  Args:
    tokens: each example's token ids, ``1 <= n_e <= seq_len``.
    masks: each example's loss mask on its target positions (module doc); the last entry is ignored
      (set to 0).
    seq_len: tokens per row ``L``.
    pad_id: the id written on padding (tokens and targets).
    packing: first-fit several examples per row (True) or one example per row (False).
    extra: ``{name: (values, fill)}``: per-example ``values[e]`` ``[n_e]`` on target positions (the
      last entry ignored), written as the masks are into an ``[N, seq_len]`` array of their dtype
      filled with ``fill`` (``PackedRows.extra[name]``).

  Returns:
    ``PackedRows`` (module doc).
  """
  if len(tokens) != len(masks):
    raise ValueError(f"tokens and masks: {len(tokens)} and {len(masks)} examples; give one mask per example")
  lengths = [len(t) for t in tokens]
  for e, (n, m) in enumerate(zip(lengths, masks)):
    if not 1 <= n <= seq_len or len(m) != n:
      raise ValueError(f"example {e}: {n} tokens and a mask of {len(m)} for rows of {seq_len}; give examples of "
                       f"1 to seq_len tokens with a mask of the same length")
  if packing:
    rows, starts = _first_fit(lengths, seq_len)
  else:
    rows, starts = np.arange(len(lengths), dtype=np.int32), np.zeros(len(lengths), np.int32)
  num_rows = int(rows.max()) + 1 if len(lengths) else 0
  shape = (num_rows, seq_len)
  out_tokens, out_targets = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
  out_mask = np.zeros(shape, np.float32)
  segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  extra = dict(extra or {})
  for name, (values, _) in extra.items():
    if len(values) != len(tokens) or any(len(v) != n for v, n in zip(values, lengths)):
      raise ValueError(f"extra[{name!r}]: give one array per example, as long as the example")
  out_extra = {name: np.full(shape, fill, np.asarray(values[0]).dtype if len(values) else np.int32)
               for name, (values, fill) in extra.items()}
  segments_in_row = np.zeros(num_rows, np.int32)
  for e, (ids, m) in enumerate(zip(tokens, masks)):
    r, s, n = int(rows[e]), int(starts[e]), lengths[e]
    segments_in_row[r] += 1
    out_tokens[r, s:s + n] = ids
    out_targets[r, s:s + n - 1] = ids[1:]
    out_mask[r, s:s + n - 1] = np.asarray(m, np.float32)[:n - 1]
    segment_ids[r, s:s + n] = segments_in_row[r]
    positions[r, s:s + n] = np.arange(n, dtype=np.int32)
    for name, (values, _) in extra.items():
      out_extra[name][r, s:s + n - 1] = np.asarray(values[e])[:n - 1]
  return PackedRows(tokens=out_tokens, targets=out_targets, mask=out_mask, segment_ids=segment_ids,
                    positions=positions, example_row=rows.astype(np.int32), example_start=starts.astype(np.int32),
                    example_length=np.asarray(lengths, np.int32), extra=out_extra)
