"""ResNets of the CRD benchmark: CIFAR ResNets (resnet8..resnet110, resnet8x4,
resnet32x4) and the CIFAR-stem ResNet50 (RepDistiller's models/resnet.py and
models/resnetv2.py).

Post-activation residual blocks (conv-BN-ReLU-conv-BN, + shortcut, ReLU); the
shortcut is a strided 1x1 conv + BN where the shape changes, else identity.
The stem is a 3x3 stride-1 conv + BN + ReLU (no max pool). Convs have no bias
and kaiming-normal (fan_out) init; the classifier has PyTorch's default init.

``model(x, *, train) -> (logits, feats)``, ``x``: ``[N, 32, 32, 3]``. ``feats``
(shapes per example, ``H x W x C``, at a 32x32 input):

  stem            stem conv + BN + ReLU
  stage{i}        stage ``i``'s output, after its last block's final ReLU
  stage{i}_preact the same before that ReLU (the residual sum)
  pool            global average pool of the last stage, fed to ``fc``

  model               stem      stage1     stage2     stage3     stage4    pool
  resnet8..resnet110  32x32x16  32x32x16   16x16x32   8x8x64     -         64
  resnet8x4, 32x4     32x32x32  32x32x64   16x16x128  8x8x256    -         256
  ResNet50            32x32x64  32x32x256  16x16x512  8x8x1024   4x4x2048  2048

CIFAR ResNets have 3 stages of ``(depth - 2) / 6`` basic blocks; ResNet50 has
4 stages of 3/4/6/3 bottlenecks (expansion 4).

Logical axis names (see kdlab.models.layers): conv kernels ``(None, None, "conv_in",
"channels")``, batch-norm scale/bias ``("channels",)``, the classifier ``fc``
kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register


class BasicBlock(nnx.Module):
  """Two 3x3 convs: ``[N, H, W, in_ch] -> [N, H/stride, W/stride, width]``."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = layers.ConvBN(in_ch, width, 3, stride=stride, rngs=rngs)
    self.conv2 = layers.ConvBN(width, width, 3, rngs=rngs)
    self.shortcut = (layers.ConvBN(in_ch, width, 1, stride=stride, rngs=rngs)
                     if stride != 1 or in_ch != width else None)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(relu(preact), preact)``."""
    h = nnx.relu(self.conv1(x, train=train))
    h = self.conv2(h, train=train)
    preact = h + (x if self.shortcut is None else self.shortcut(x, train=train))
    return nnx.relu(preact), preact


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand.

  ``[N, H, W, in_ch] -> [N, H/stride, W/stride, 4 * width]``.
  """

  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = layers.ConvBN(in_ch, width, 1, rngs=rngs)
    self.conv2 = layers.ConvBN(width, width, 3, stride=stride, rngs=rngs)
    self.conv3 = layers.ConvBN(width, out_ch, 1, rngs=rngs)
    self.shortcut = (layers.ConvBN(in_ch, out_ch, 1, stride=stride, rngs=rngs)
                     if stride != 1 or in_ch != out_ch else None)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(relu(preact), preact)``."""
    h = nnx.relu(self.conv1(x, train=train))
    h = nnx.relu(self.conv2(h, train=train))
    h = self.conv3(h, train=train)
    preact = h + (x if self.shortcut is None else self.shortcut(x, train=train))
    return nnx.relu(preact), preact


class ResNet(nnx.Module):
  """ResNet for 32x32 inputs; every stage after the first halves the resolution.

  See the module docstring for ``feats``.
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int],
               widths: Sequence[int], *, stem_width: int, num_classes: int = 100,
               in_channels: int = 3, rngs: nnx.Rngs):
    if len(num_blocks) != len(widths):
      raise ValueError(f"num_blocks {tuple(num_blocks)} and widths {tuple(widths)} "
                       "differ in length")
    self.stem = layers.ConvBN(in_channels, stem_width, 3, rngs=rngs)
    stages = []
    in_ch = stem_width
    for i, (n, width) in enumerate(zip(num_blocks, widths)):
      blocks = []
      for j in range(n):
        blocks.append(block(in_ch, width, 2 if i > 0 and j == 0 else 1, rngs=rngs))
        in_ch = width * block.expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.fc = layers.linear(in_ch, num_classes, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    feats = {}
    h = nnx.relu(self.stem(x, train=train))
    feats["stem"] = h
    h = layers.run_stages(h, self.stages, feats, train=train)
    h = layers.global_avg_pool(h)
    feats["pool"] = h
    return self.fc(h), feats


def cifar_resnet(depth: int, widths: Sequence[int], *, num_classes: int = 100, in_channels: int = 3,
                 rngs: nnx.Rngs) -> ResNet:
  """CIFAR ResNet of ``depth = 6n + 2`` layers; ``widths`` = (stem, stage1, stage2, stage3)."""
  if (depth - 2) % 6:
    raise ValueError(f"depth must be 6n + 2 for basic blocks, got {depth}")
  n = (depth - 2) // 6
  return ResNet(BasicBlock, (n, n, n), widths[1:], stem_width=widths[0],
                num_classes=num_classes, in_channels=in_channels, rngs=rngs)


_CIFAR_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
for _name, (_depth, _widths) in _CIFAR_RESNETS.items():
  register(_name)(functools.partial(cifar_resnet, _depth, _widths))


@register("ResNet50")
def resnet50(*, num_classes: int = 100, rngs: nnx.Rngs) -> ResNet:
  """ResNet50 with a CIFAR stem (3x3 stride-1 conv, no max pool), as RepDistiller's resnetv2.py."""
  return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem_width=64,
                num_classes=num_classes, rngs=rngs)
