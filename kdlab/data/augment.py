"""Per-example augmentations on uint8 images ``[H, W, C]`` (numpy, run in the grain pipeline).

Augmentation happens once per example before any model sees it, so teachers
and the student see the same view (consistent teaching).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """``image`` translated by (dy, dx) pixels, zero-filled."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def jitter(image: np.ndarray, rng: np.random.Generator, *, max_shift: int = 2) -> np.ndarray:
  """Random translation by up to ``max_shift`` pixels each way (Hinton et al. 2015's MNIST jitter)."""
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
  return shift(image, int(dy), int(dx))


def crop_flip(image: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
  """Random crop with ``padding`` pixels of zero padding, then a random horizontal flip (CIFAR)."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  y, x = rng.integers(0, 2 * padding + 1, size=2)
  out = padded[y:y + h, x:x + w]
  return out[:, ::-1] if rng.random() < 0.5 else out


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "jitter": jitter,
    "crop_flip": crop_flip,
}
