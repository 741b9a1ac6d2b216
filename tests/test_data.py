import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdlab.data import eval_batches, load, train_dataset
from kdlab.data.augment import crop_flip, jitter, shift
from kdlab.errors import UserError


def test_mnist5k_split_is_stratified_and_fixed():
  train, test = load("mnist5k", "train"), load("mnist5k", "test")
  assert (len(train), len(test)) == (4000, 1000)
  assert np.all(np.bincount(train.labels()) == 400) and np.all(np.bincount(test.labels()) == 100)
  assert train.image_shape == (28, 28, 1) and train[0]["image"].dtype == np.uint8
  # Train and test are disjoint images.
  train_set = {train[i]["image"].tobytes() for i in range(len(train))}
  assert not any(test[i]["image"].tobytes() in train_set for i in range(len(test)))
  again = load("mnist5k", "test")
  assert np.array_equal(again[17]["image"], test[17]["image"])


def test_digits_source_and_label_filter():
  train = load("digits", "train")
  assert train.image_shape == (8, 8, 1) and train.num_classes == 10
  no3 = train.without_labels([3])
  assert 3 not in no3.labels() and len(no3) == len(train) - int(np.sum(train.labels() == 3))
  assert [no3[i]["index"] for i in range(3)] == [0, 1, 2]


def test_unknown_source():
  with pytest.raises(UserError, match="data.source: unknown source"):
    load("mnist6k", "train")


def test_tfds_source_with_mock_data():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = load("tfds:mnist", "train")
    assert len(source) == 12 and source.num_classes == 10 and source.image_shape == (28, 28, 1)
    batch = train_dataset(source, batch_size=4, seed=0, augment="jitter")[0]
    assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32


def test_shift_and_jitter():
  img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  moved = shift(img, 1, -1)
  assert moved[1, 0, 0] == img[0, 1, 0] and np.all(moved[0] == 0) and np.all(moved[:, -1] == 0)
  rng = np.random.default_rng(0)
  for _ in range(20):
    out = jitter(img, rng, max_shift=2)
    assert out.shape == img.shape and out.sum() <= img.sum()
  assert crop_flip(np.ones((8, 8, 3), np.uint8), rng, padding=2).shape == (8, 8, 3)


def test_pipeline_is_deterministic_and_resumable():
  source = load("digits", "train")
  a = train_dataset(source, batch_size=32, seed=5, augment="jitter")
  b = train_dataset(source, batch_size=32, seed=5, augment="jitter")
  assert np.array_equal(a[3]["image"], b[3]["image"])
  assert not np.array_equal(a[3]["image"], train_dataset(source, batch_size=32, seed=6, augment="jitter")[3]["image"])
  # Epochs are reshuffled: every example once per epoch.
  per_epoch = len(source) // 32
  seen = np.concatenate([a[i]["index"] for i in range(per_epoch)])
  assert len(np.unique(seen)) == len(seen)
  # Iterator state restores the exact position.
  it = iter(a.to_iter_dataset())
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = next(it)
  it2 = iter(b.to_iter_dataset())
  it2.set_state(state)
  assert np.array_equal(next(it2)["image"], expected["image"])


def test_eval_batches_pad_with_mask():
  source = load("digits", "test")
  batches = list(eval_batches(source, batch_size=100))
  assert all(b["image"].shape[0] == 100 for b in batches)
  assert sum(int(b["mask"].sum()) for b in batches) == len(source)
  assert sorted(np.concatenate([b["index"][b["mask"]] for b in batches]).tolist()) == list(range(len(source)))
