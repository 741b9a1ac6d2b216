"""Per-example augmentations on uint8 images ``[H, W, C]`` (numpy, run in the grain pipeline).

Augmentation happens once per example before any model sees it, so teachers
and the student see the same view (consistent teaching). An :class:`Augmentation`
draws the random parameters of a whole global batch at once and applies them image
by image, so an example's view is the same however the batch is split between
processes (each augments only its own rows).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Augmentation(NamedTuple):
  """``draw(rng, n)``: int parameters ``[n, P]`` for ``n`` images; ``apply(image [H, W, C], params [P])``."""
  draw: Callable[[np.random.Generator, int], np.ndarray]
  apply: Callable[[np.ndarray, np.ndarray], np.ndarray]


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """``image`` translated by (dy, dx) pixels, zero-filled."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def crop_flip(image: np.ndarray, y: int, x: int, flip: bool, *, padding: int = 4) -> np.ndarray:
  """The crop at (``y``, ``x``) of ``image`` zero-padded by ``padding`` pixels, then mirrored if ``flip``."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  out = padded[y:y + h, x:x + w]
  return out[:, ::-1] if flip else out


# Hinton et al. 2015's MNIST jitter: a random translation by up to 2 pixels each way.
JITTER = Augmentation(draw=lambda rng, n: rng.integers(-2, 3, size=(n, 2)),
                      apply=lambda image, p: shift(image, int(p[0]), int(p[1])))
# CIFAR: a random crop of the image padded by 4 pixels, then a random horizontal flip.
CROP_FLIP = Augmentation(draw=lambda rng, n: np.concatenate([rng.integers(0, 9, size=(n, 2)),
                                                             rng.integers(0, 2, size=(n, 1))], axis=1),
                         apply=lambda image, p: crop_flip(image, int(p[0]), int(p[1]), bool(p[2])))

AUGMENTATIONS: dict[str, Augmentation] = {"jitter": JITTER, "crop_flip": CROP_FLIP}


def augment_rows(augmentation: Augmentation, images: np.ndarray, rng: np.random.Generator, batch_size: int,
                 first_row: int) -> np.ndarray:
  """``images [b, H, W, C]``, rows ``first_row ..`` of a global batch of ``batch_size``, each augmented
  with its row's parameters out of those drawn for the whole batch from ``rng``."""
  params = augmentation.draw(rng, batch_size)[first_row:first_row + len(images)]
  return np.stack([augmentation.apply(image, p) for image, p in zip(images, params)])
