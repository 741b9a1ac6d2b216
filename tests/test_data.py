import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdlab import cli
from kdlab.data import eval_batches, load, train_dataset
from kdlab.data.augment import AUGMENTATIONS, augment_rows, crop_flip, shift
from kdlab.errors import UserError

from conftest import HINTON


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


def test_tfds_source_not_prepared_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  data_dir.mkdir()
  code = cli.main(["train", f"--config={HINTON}:student,source=tfds:mnist,quick", f"--workdir={workdir}",
                   f"--config.data.data_dir={data_dir}", "--nowandb", "--no-progress"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("kdlab")]
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("kdlab: error: data.source=tfds:mnist: TFDS dataset not available locally (")
  assert err[0].endswith("); prepare it under data.data_dir first")
  assert not workdir.exists() and not any(data_dir.rglob("*"))  # Nothing trained, nothing downloaded.


def _shifted(image: np.ndarray, dy: int, dx: int, pad: int = 2) -> np.ndarray:
  """``image`` moved down ``dy`` and right ``dx`` pixels, zero-filled (by padding and cropping)."""
  h, w = image.shape[:2]
  return np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[pad - dy:pad - dy + h, pad - dx:pad - dx + w]


OFFSETS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]


def test_shift_moves_the_image_and_fills_zeros():
  img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  moved = shift(img, 1, -1)
  assert moved[1, 0, 0] == img[0, 1, 0] and np.all(moved[0] == 0) and np.all(moved[:, -1] == 0)
  for dy, dx in OFFSETS:
    assert np.array_equal(shift(img, dy, dx), _shifted(img, dy, dx))
  img3 = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  assert np.array_equal(crop_flip(img3, 2, 2, False, padding=2), img3)
  assert np.array_equal(crop_flip(img3, 2, 2, True, padding=2), img3[:, ::-1])
  assert np.array_equal(crop_flip(img3, 3, 1, False, padding=2), _shifted(img3, -1, 1))


def test_jitter_translates_by_a_random_offset_of_at_most_max_shift():
  img = np.random.default_rng(1).integers(1, 256, (7, 6, 1), dtype=np.uint8)  # No zeros: every offset differs.
  seen = []
  jitter = AUGMENTATIONS["jitter"]
  for seed in range(40):
    out = jitter.apply(img, jitter.draw(np.random.default_rng(seed), 1)[0])
    offsets = [o for o in OFFSETS if np.array_equal(out, _shifted(img, *o))]
    assert len(offsets) == 1, seed
    seen += offsets
  assert len(set(seen)) >= 12 and seen.count((0, 0)) <= 8  # Spread over the 25 offsets; mostly moved.


def test_jitter_augmentation_moves_training_images_of_the_pipeline():
  source = load("digits", "train")
  plain = train_dataset(source, batch_size=64, seed=3)[0]
  batch = train_dataset(source, batch_size=64, seed=3, augment="jitter")[0]
  assert np.array_equal(batch["index"], plain["index"])
  moved = 0
  for image, i in zip(batch["image"], batch["index"]):
    original = source[int(i)]["image"]
    matches = [o for o in OFFSETS if np.allclose(image, _shifted(original, *o) / 255.0)]
    assert matches, i  # Every image is its source image translated by at most 2 pixels.
    moved += (0, 0) not in matches
  assert moved >= 32


def test_a_share_of_the_rows_is_read_and_augmented_as_the_whole_batch_has_them():
  """Each process of a multi-process run reads rows (lo, hi) of every global batch: the same examples
  and the same augmented views as those rows of the whole batch, and only those are gathered."""
  source = load("digits", "train")
  for augment in (None, "jitter"):
    whole = train_dataset(source, batch_size=32, seed=4, augment=augment)
    parts = [train_dataset(source, batch_size=32, seed=4, augment=augment, rows=(lo, lo + 8)) for lo in (0, 8, 16, 24)]
    for step in (0, 1, 57):
      for k in ("image", "label", "index"):
        assert np.array_equal(np.concatenate([p[step][k] for p in parts]), whole[step][k]), (augment, step, k)
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (4, 6, 6, 1), dtype=np.uint8)
  full = augment_rows(AUGMENTATIONS["crop_flip"], np.concatenate([images] * 2), np.random.default_rng(3), 8, 0)
  assert np.array_equal(augment_rows(AUGMENTATIONS["crop_flip"], images, np.random.default_rng(3), 8, 4), full[4:])
  evals = list(eval_batches(source, batch_size=48))
  shares = [list(eval_batches(source, batch_size=48, rows=(lo, lo + 24))) for lo in (0, 24)]
  assert len(evals) == len(shares[0]) == len(shares[1])
  for i, batch in enumerate(evals):
    for k in batch:
      assert np.array_equal(np.concatenate([shares[0][i][k], shares[1][i][k]]), batch[k]), (i, k)
  assert not evals[-1]["mask"].all()  # The last batch is padded, and its padding split the same way.


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
