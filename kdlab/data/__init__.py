"""Data: offline and TFDS sources, grain pipelines, augmentation."""

from kdlab.data.pipeline import eval_batches, train_dataset
from kdlab.data.sources import Source, load
