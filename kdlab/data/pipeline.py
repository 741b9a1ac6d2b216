"""grain pipelines: seeded, checkpointable training batches and padded eval batches.

A batch is a dict of numpy arrays: ``image`` float32 ``[B, H, W, C]``
(normalized), ``label`` int32 ``[B]``, ``index`` int32 ``[B]`` (position in the
split) and ``mask`` bool ``[B]`` (False on eval padding).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from kdlab.data.augment import AUGMENTATIONS
from kdlab.data.sources import Source
from kdlab.errors import UserError


class Normalize:
  """uint8 image -> float32 ``(x / 255 - mean) / std`` per channel."""

  def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    image = (np.asarray(record["image"], np.float32) / 255.0 - self.mean) / self.std
    return {**record, "image": image, "mask": np.True_}


def train_dataset(source: Source, *, batch_size: int, seed: int, augment: str | None = None,
                  mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> grain.MapDataset:
  """Endless training batches: reshuffled every epoch, augmented, batched.

  Random access by batch number makes the pipeline deterministic per ``seed``;
  its iterator's ``get_state()`` is saved with each checkpoint.
  """
  if augment is not None and augment not in AUGMENTATIONS:
    raise UserError(f"data.augment: unknown augmentation {augment!r}; "
                    f"choose one of {sorted(AUGMENTATIONS)} or None")
  if batch_size > len(source):
    raise UserError(f"data.batch_size={batch_size} is larger than the training set ({len(source)} examples)")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  if augment is not None:
    fn = AUGMENTATIONS[augment]
    ds = ds.random_map(lambda r, rng: {**r, "image": fn(np.asarray(r["image"]), rng)}, seed=seed + 1)
  return ds.map(Normalize(mean, std)).batch(batch_size, drop_remainder=True)


def eval_batches(source: Source, *, batch_size: int, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,)) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, in fixed-size batches; the last is padded with ``mask=False``."""
  ds = grain.MapDataset.source(source).map(Normalize(mean, std)).batch(batch_size)
  for batch in ds:
    n = len(batch["label"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch
