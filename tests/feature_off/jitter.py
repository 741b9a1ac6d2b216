"""Jitter off: the ``jitter`` augmentation returns the image unmoved (the identity)."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_data.py::test_jitter_translates_by_a_random_offset_of_at_most_max_shift",
    "tests/test_data.py::test_jitter_augmentation_moves_training_images_of_the_pipeline",
)


def disable() -> None:
  from kdlab.data import augment
  augment.AUGMENTATIONS["jitter"] = augment.Augmentation(draw=augment.JITTER.draw, apply=lambda image, p: image)


pytest_configure = plugin(__name__, disable)
