"""MobileNetV2 of the CRD benchmark: RepDistiller's ``mobile_half`` (expansion
6, width multiplier 0.5, models/mobilenetv2.py), registered as ``MobileNetV2``.

Differences from the ImageNet MobileNetV2 that the reference has and we keep:
the stem is a stride-2 3x3 conv even on 32x32 inputs; the first inverted
residual (expansion 1) still has its 1x1 expansion conv; the last 1x1 conv
has 1280 channels whatever the width multiplier (<= 1); ReLU, not ReLU6.
Convs have no bias and kaiming-normal (fan_out) init; classifier N(0, 0.01),
bias 0.

``model(x, *, train) -> (logits, feats)``, ``x``: ``[N, 32, 32, 3]``. ``feats``
at a 32x32 input (widths for ``width_mult=0.5``):

  stem            ``[N, 16, 16, 16]``  stride-2 conv + BN + ReLU
  stage1          ``[N, 16, 16, 12]``  after inverted-residual groups 0-1
  stage2          ``[N, 8, 8, 16]``    after group 2
  stage3          ``[N, 4, 4, 48]``    after groups 3-4
  stage4          ``[N, 2, 2, 160]``   after groups 5-6
  stage{i}_preact the same arrays: blocks end in a linear (BN, no ReLU)
                  projection, so there is no activation to take off
  pool            ``[N, 1280]``        global average pool of the 1x1 head conv

Logical axis names (see kdlab.models.layers): conv kernels ``(None, None, "conv_in",
"channels")``, batch-norm scale/bias ``("channels",)``, the ``classifier``
kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import jax
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register

# (expansion, width, blocks, stride) per group; expansion None means "the model's".
_GROUPS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# Last group index of each feature stage.
_STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nnx.Module):
  """1x1 expand, 3x3 depthwise (strided), 1x1 linear projection; residual when shapes match.

  ``[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch]``.
  """

  def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
    hidden = in_ch * expansion
    self.expand = layers.ConvBN(in_ch, hidden, 1, rngs=rngs)
    self.depthwise = layers.ConvBN(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs)
    self.project = layers.ConvBN(hidden, out_ch, 1, rngs=rngs)
    self.residual = stride == 1 and in_ch == out_ch

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = nnx.relu(self.expand(x, train=train))
    h = nnx.relu(self.depthwise(h, train=train))
    h = self.project(h, train=train)
    return x + h if self.residual else h


class MobileNetV2(nnx.Module):
  """CIFAR MobileNetV2. See the module docstring for ``feats``."""

  def __init__(self, *, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100,
               rngs: nnx.Rngs):
    in_ch = int(32 * width_mult)
    self.stem = layers.ConvBN(3, in_ch, 3, stride=2, rngs=rngs)
    groups = []
    for t, c, n, s in _GROUPS:
      out_ch = int(c * width_mult)
      blocks = []
      for j in range(n):
        blocks.append(InvertedResidual(in_ch, out_ch, s if j == 0 else 1,
                                       expansion if t is None else t, rngs=rngs))
        in_ch = out_ch
      groups.append(nnx.List(blocks))
    self.groups = nnx.List(groups)
    head_ch = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.head = layers.ConvBN(in_ch, head_ch, 1, rngs=rngs)
    self.classifier = layers.linear(head_ch, num_classes,
                                    kernel_init=jax.nn.initializers.normal(0.01),
                                    bias_init=layers.zeros, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    h = nnx.relu(self.stem(x, train=train))
    feats = {"stem": h}
    for g, group in enumerate(self.groups):
      for block in group:
        h = block(h, train=train)
      if g in _STAGE_ENDS:
        i = _STAGE_ENDS.index(g) + 1
        feats[f"stage{i}_preact"] = h
        feats[f"stage{i}"] = h
    h = layers.global_avg_pool(nnx.relu(self.head(h, train=train)))
    feats["pool"] = h
    return self.classifier(h), feats


@register("MobileNetV2")
def mobilenetv2_half(*, num_classes: int = 100, rngs: nnx.Rngs) -> MobileNetV2:
  """RepDistiller's ``mobile_half``: expansion 6, width multiplier 0.5."""
  return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes, rngs=rngs)
