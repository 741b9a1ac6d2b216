"""ShuffleNets of the CRD benchmark: ``ShuffleV1`` (groups 3, widths
240/480/960, RepDistiller's models/ShuffleNetv1.py) and ``ShuffleV2`` (1x,
widths 116/232/464, head 1024, models/ShuffleNetv2.py).

Both use a 1x1 stride-1 stem conv (24 channels) + BN + ReLU and no max pool,
so the three stages run at 16x16, 8x8 and 4x4 on 32x32 inputs. All layers
keep PyTorch's default init (the reference sets none).

``model(x, *, train) -> (logits, feats)``, ``x``: ``[N, 32, 32, 3]``. ``feats``
at a 32x32 input:

  ShuffleV1:
    stem            ``[N, 32, 32, 24]``
    stage1          ``[N, 16, 16, 240]``  after the last block's final ReLU
    stage2          ``[N, 8, 8, 480]``
    stage3          ``[N, 4, 4, 960]``
    stage{i}_preact same shapes, the last block's sum before that ReLU
    pool            ``[N, 960]``
  ShuffleV2:
    stem            ``[N, 32, 32, 24]``
    stage1          ``[N, 16, 16, 116]``  last block's output (ReLU, concat, shuffle)
    stage2          ``[N, 8, 8, 232]``
    stage3          ``[N, 4, 4, 464]``
    stage{i}_preact same shapes: ``concat(passthrough half, branch before its
                    ReLU)`` *before* the channel shuffle, as RepDistiller returns
                    it, so its channels are a permutation of ``stage{i}``'s
    pool            ``[N, 1024]``         global average pool of the 1x1 head conv

Logical axis names (see kdlab.models.layers): conv kernels ``(None, None, "conv_in",
"channels")``, batch-norm scale/bias ``("channels",)``, the classifier ``fc``
kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
             rngs: nnx.Rngs) -> layers.ConvBN:
  return layers.ConvBN(in_ch, out_ch, kernel_size, stride=stride, groups=groups,
                       kernel_init=layers.torch_default, rngs=rngs)


class ShuffleV1Block(nnx.Module):
  """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1; added to the input (stride 1)
  or concatenated with its 3x3 average pool (stride 2).

  ``[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch (+ in_ch if stride 2)]``.
  """

  def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, *, rngs: nnx.Rngs):
    mid = out_ch // 4
    # The first block sees the 24-channel stem, too few to split into groups.
    self.first_groups = 1 if in_ch == 24 else groups
    self.stride = stride
    self.conv1 = _conv_bn(in_ch, mid, 1, groups=self.first_groups, rngs=rngs)
    self.conv2 = _conv_bn(mid, mid, 3, stride=stride, groups=mid, rngs=rngs)
    self.conv3 = _conv_bn(mid, out_ch, 1, groups=groups, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(relu(preact), preact)``."""
    h = nnx.relu(self.conv1(x, train=train))
    h = layers.channel_shuffle(h, self.first_groups)
    h = nnx.relu(self.conv2(h, train=train))
    h = self.conv3(h, train=train)
    if self.stride == 2:
      # count_include_pad: PyTorch's AvgPool2d divides by 9 at the borders too.
      shortcut = nnx.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                              count_include_pad=True)
      preact = jnp.concatenate([h, shortcut], axis=-1)
    else:
      preact = h + x
    return nnx.relu(preact), preact


class ShuffleNetV1(nnx.Module):
  """ShuffleNet V1 for 32x32 inputs. See the module docstring for ``feats``."""

  def __init__(self, *, widths: tuple[int, ...] = (240, 480, 960),
               num_blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3,
               num_classes: int = 100, rngs: nnx.Rngs):
    self.stem = _conv_bn(3, 24, 1, rngs=rngs)
    in_ch = 24
    stages = []
    for width, n in zip(widths, num_blocks):
      # The strided first block concatenates its input, so its branch makes only the rest.
      blocks = [ShuffleV1Block(in_ch, width - in_ch, 2, groups, rngs=rngs)]
      blocks += [ShuffleV1Block(width, width, 1, groups, rngs=rngs) for _ in range(n - 1)]
      stages.append(nnx.List(blocks))
      in_ch = width
    self.stages = nnx.List(stages)
    self.fc = layers.linear(in_ch, num_classes, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    h = nnx.relu(self.stem(x, train=train))
    feats = {"stem": h}
    h = layers.run_stages(h, self.stages, feats, train=train)
    h = layers.global_avg_pool(h)
    feats["pool"] = h
    return self.fc(h), feats


class ShuffleV2Down(nnx.Module):
  """Strided unit: two branches at half the output width each, concatenated and shuffled.

  ``[N, H, W, in_ch] -> [N, H/2, W/2, out_ch]``.
  """

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    mid = out_ch // 2
    # left: 3x3 depthwise (no ReLU), 1x1
    self.left_dw = _conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch, rngs=rngs)
    self.left_pw = _conv_bn(in_ch, mid, 1, rngs=rngs)
    # right: 1x1, 3x3 depthwise (no ReLU), 1x1
    self.right_pw1 = _conv_bn(in_ch, mid, 1, rngs=rngs)
    self.right_dw = _conv_bn(mid, mid, 3, stride=2, groups=mid, rngs=rngs)
    self.right_pw2 = _conv_bn(mid, mid, 1, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    left = nnx.relu(self.left_pw(self.left_dw(x, train=train), train=train))
    right = nnx.relu(self.right_pw1(x, train=train))
    right = nnx.relu(self.right_pw2(self.right_dw(right, train=train), train=train))
    return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Block(nnx.Module):
  """Channel split: the first half passes through, the second goes through
  1x1, 3x3 depthwise, 1x1; concatenated and shuffled. ``[N, H, W, C] -> [N, H, W, C]``.
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.split = channels // 2
    branch = channels - self.split
    self.conv1 = _conv_bn(branch, branch, 1, rngs=rngs)
    self.conv2 = _conv_bn(branch, branch, 3, groups=branch, rngs=rngs)
    self.conv3 = _conv_bn(branch, branch, 1, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(out, preact)``; ``preact`` is unshuffled (see the module docstring)."""
    keep, h = x[..., :self.split], x[..., self.split:]
    h = nnx.relu(self.conv1(h, train=train))
    h = self.conv2(h, train=train)
    h = self.conv3(h, train=train)
    preact = jnp.concatenate([keep, h], axis=-1)
    out = jnp.concatenate([keep, nnx.relu(h)], axis=-1)
    return layers.channel_shuffle(out, 2), preact


class ShuffleNetV2(nnx.Module):
  """ShuffleNet V2 for 32x32 inputs. See the module docstring for ``feats``."""

  def __init__(self, *, widths: tuple[int, ...] = (116, 232, 464), head_width: int = 1024,
               num_blocks: tuple[int, ...] = (3, 7, 3), num_classes: int = 100,
               rngs: nnx.Rngs):
    self.stem = _conv_bn(3, 24, 1, rngs=rngs)
    in_ch = 24
    downs, stages = [], []
    for width, n in zip(widths, num_blocks):
      downs.append(ShuffleV2Down(in_ch, width, rngs=rngs))
      stages.append(nnx.List([ShuffleV2Block(width, rngs=rngs) for _ in range(n)]))
      in_ch = width
    self.downs = nnx.List(downs)
    self.stages = nnx.List(stages)
    self.head = _conv_bn(in_ch, head_width, 1, rngs=rngs)
    self.fc = layers.linear(head_width, num_classes, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    h = nnx.relu(self.stem(x, train=train))
    feats = {"stem": h}
    for i, (down, stage) in enumerate(zip(self.downs, self.stages), start=1):
      h = down(h, train=train)
      for block in stage:
        h, preact = block(h, train=train)
      feats[f"stage{i}_preact"] = preact
      feats[f"stage{i}"] = h
    h = layers.global_avg_pool(nnx.relu(self.head(h, train=train)))
    feats["pool"] = h
    return self.fc(h), feats


@register("ShuffleV1")
def shufflev1(*, num_classes: int = 100, rngs: nnx.Rngs) -> ShuffleNetV1:
  """ShuffleNet V1, groups 3, stage widths 240/480/960, 4/8/4 blocks."""
  return ShuffleNetV1(num_classes=num_classes, rngs=rngs)


@register("ShuffleV2")
def shufflev2(*, num_classes: int = 100, rngs: nnx.Rngs) -> ShuffleNetV2:
  """ShuffleNet V2 1x: stage widths 116/232/464, 3/7/3 blocks after each strided unit, head 1024."""
  return ShuffleNetV2(num_classes=num_classes, rngs=rngs)
