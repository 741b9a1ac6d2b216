"""Imports every CIFAR zoo family so that their models are registered.

Names (``kdlab.models.create(name, num_classes=...)``): resnet8, resnet14,
resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4,
ResNet50, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16,
vgg19, MobileNetV2, ShuffleV1, ShuffleV2. See docs/models.md.
"""

from __future__ import annotations

from kdlab.models import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (registration)
