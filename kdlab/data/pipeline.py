"""grain pipelines: seeded, checkpointable training batches and padded eval batches.

An image batch is a dict of numpy arrays: ``image`` float32 ``[B, H, W, C]``
(normalized), ``label`` int32 ``[B]``, ``index`` int32 ``[B]`` (position in the
split) and ``mask`` bool ``[B]`` (False on eval padding).

A text batch (``text_train_dataset`` / ``text_eval_batches``) has ``tokens`` and
``targets`` int32 ``[B, L]``, ``token_mask`` float32 ``[B, L]`` (1 for real
targets, 0 for packing and eval padding), ``index`` int32 ``[B]`` (the
sequence's position in its split) and ``mask`` bool ``[B]`` (False for a padded
eval sequence). ``mask`` stays per example so the objective averages per-sequence
losses exactly as it averages per-image ones. Rows of packed examples
(:mod:`kdlab.data.packing`, the ``jsonl:``/``parquet:`` sources) also carry
``segment_ids`` and ``positions`` int32 ``[B, L]`` (0 on padding, eval padding too), and
cross-tokenizer rows (``config.data.teacher_tokenizer``, :mod:`kdlab.data.instruct`) the teacher's
tokenization: ``teacher_tokens``, ``teacher_targets`` int32 ``[B, Lt]``, ``teacher_token_mask``
float32 ``[B, Lt]``, and the aligned chunks ``student_chunks`` int32 ``[B, L]``, ``teacher_chunks``
int32 ``[B, Lt]`` (-1 outside chunks, on eval padding too).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from kdlab.data.augment import AUGMENTATIONS, augment_rows
from kdlab.data.sources import ArrayRecords, Source
from kdlab.data.text import TextSource
from kdlab.errors import UserError


class Normalize:
  """uint8 images ``[..., H, W, C]`` -> float32 ``(x / 255 - mean) / std`` per channel."""

  def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    image = (np.asarray(batch["image"], np.float32) / 255.0 - self.mean) / self.std
    return {**batch, "image": image}


def gather(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
  """The records ``indices`` of ``source`` as one batch (vectorized for in-memory sources)."""
  records = source.records
  if isinstance(records, ArrayRecords):
    return {"image": records.images[indices], "label": records.labels[indices],
            "index": indices.astype(np.int32), "mask": np.ones(len(indices), bool)}
  rows = [records[int(i)] for i in indices]
  return {"image": np.stack([r["image"] for r in rows]), "label": np.asarray([r["label"] for r in rows], np.int32),
          "index": np.asarray([r["index"] for r in rows], np.int32), "mask": np.ones(len(indices), bool)}


class EpochBatches:
  """Random-access batches of example indices: a fresh permutation every epoch, remainder dropped.

  ``[i]`` is batch ``i % steps_per_epoch`` of epoch ``i // steps_per_epoch``,
  from a permutation seeded by ``(seed, epoch)``: deterministic and cheap to
  resume anywhere. With ``rows=(lo, hi)`` only those rows of each global batch of
  ``batch_size`` (one process's share of a multi-process run).
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, rows: tuple[int, int] | None = None):
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.rows = rows or (0, batch_size)
    self.steps_per_epoch = num_examples // batch_size
    self._epoch, self._perm = -1, np.empty(0, np.int64)

  def __len__(self) -> int:
    return 2**62  # Endless; the train loop decides when to stop.

  def __getitem__(self, i: int) -> np.ndarray:
    epoch, j = divmod(int(i), self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    lo, hi = self.rows
    return self._perm[j * self.batch_size + lo:j * self.batch_size + hi]


def train_dataset(source: Source, *, batch_size: int, seed: int, augment: str | None = None,
                  mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                  rows: tuple[int, int] | None = None) -> grain.MapDataset:
  """Endless training batches: reshuffled every epoch, gathered, augmented, normalized.

  Random access by batch number makes the pipeline deterministic per ``seed``;
  its iterator's ``get_state()`` is saved with each checkpoint. ``rows=(lo, hi)``:
  only those rows of every global batch are read and augmented, exactly as the whole
  batch would have them.
  """
  if augment is not None and augment not in AUGMENTATIONS:
    raise UserError(f"data.augment: unknown augmentation {augment!r}; "
                    f"choose one of {sorted(AUGMENTATIONS)} or None")
  if batch_size > len(source):
    raise UserError(f"data.batch_size={batch_size} is larger than the training set ({len(source)} examples)")
  batches = EpochBatches(len(source), batch_size, seed, rows)
  ds = grain.MapDataset.source(batches).map(lambda indices: gather(source, indices))
  if augment is not None:
    augmentation = AUGMENTATIONS[augment]
    ds = ds.map_with_index(lambda i, b: {**b, "image": augment_rows(
        augmentation, b["image"], np.random.default_rng([seed + 1, i]), batch_size, batches.rows[0])})
  return ds.map(Normalize(mean, std))


# Batch entries whose padding is not 0: chunk ids (0 is a chunk; -1 is none).
_PAD_FILL = {"student_chunks": -1, "teacher_chunks": -1}


def _pad_rows(rows: tuple[int, int], start: int, end: int, gather_fn: Any) -> dict[str, np.ndarray]:
  """Rows ``rows`` of the eval batch starting at split position ``start``; positions at or past ``end``
  (the split's size) are padding (``mask=False``): zeros, -1 for chunk ids."""
  positions = np.arange(start + rows[0], start + rows[1])
  batch = gather_fn(np.minimum(positions, end - 1))
  padding = positions >= end
  if padding.any():
    batch = {k: np.where(padding.reshape((-1,) + (1,) * (v.ndim - 1)), np.asarray(_PAD_FILL.get(k, 0), v.dtype), v)
             for k, v in batch.items()}
  return batch


def eval_batches(source: Source, *, batch_size: int, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), rows: tuple[int, int] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, in fixed-size batches; the last is padded with ``mask=False``.
  ``rows=(lo, hi)``: only those rows of each batch (one process's share)."""
  normalize = Normalize(mean, std)
  for start in range(0, len(source), batch_size):
    yield normalize(_pad_rows(rows or (0, batch_size), start, len(source),
                              lambda indices: gather(source, indices)))


def gather_text(source: TextSource, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Sequences ``indices`` of ``source`` as one text batch (see the module docstring)."""
  packed = source.records
  batch = {"tokens": packed.tokens[indices], "targets": packed.targets[indices],
           "token_mask": packed.mask[indices].astype(np.float32), "index": np.asarray(indices, np.int32),
           "mask": np.ones(len(indices), bool)}
  if getattr(packed, "segment_ids", None) is not None:  # packed examples (kdlab.data.packing)
    batch["segment_ids"] = packed.segment_ids[indices]
    batch["positions"] = packed.positions[indices]
  for key, values in getattr(packed, "extra", {}).items():  # the teacher's tokenization of cross-tokenizer rows
    batch[key] = values[indices]
  return batch


def text_train_dataset(source: TextSource, *, batch_size: int, seed: int, rows: tuple[int, int] | None = None
                       ) -> grain.MapDataset:
  """Endless training batches of sequences, reshuffled every epoch (as :func:`train_dataset`, ``rows`` too)."""
  if batch_size > len(source):
    raise UserError(f"data.batch_size={batch_size} is larger than the training set ({len(source)} sequences)")
  ds = grain.MapDataset.source(EpochBatches(len(source), batch_size, seed, rows))
  return ds.map(lambda indices: gather_text(source, indices))


def text_eval_batches(source: TextSource, *, batch_size: int, rows: tuple[int, int] | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order; the last batch is padded with ``mask=False``, ``token_mask=0``
  (``rows`` as in :func:`eval_batches`)."""
  for start in range(0, len(source), batch_size):
    yield _pad_rows(rows or (0, batch_size), start, len(source), lambda indices: gather_text(source, indices))
