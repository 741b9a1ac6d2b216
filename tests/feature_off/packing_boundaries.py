"""Packed examples off: targets run on across the row (the next example's first token is the last
token's target, and counted), as stream packing would have them."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_instruct_data.py::test_packing_invariants[True]",)


def disable() -> None:
  import numpy as np
  from kdlab.data import packing
  pack = packing.pack

  def stream_targets(*args, **kwargs):
    rows = pack(*args, **kwargs)
    real = rows.segment_ids > 0
    targets = np.concatenate([rows.tokens[:, 1:], rows.tokens[:, -1:]], 1)
    nxt = np.concatenate([real[:, 1:], np.zeros_like(real[:, :1])], 1)
    ends = real & nxt & (rows.mask == 0) & (np.roll(rows.positions, -1, 1) == 0)
    return packing.PackedRows(rows.tokens, np.where(real, targets, rows.targets), np.where(ends, 1.0, rows.mask)
                              .astype(np.float32), rows.segment_ids, rows.positions, rows.example_row,
                              rows.example_start, rows.example_length)

  packing.pack = stream_targets


pytest_configure = plugin(__name__, disable)
