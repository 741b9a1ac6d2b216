"""Wide ResNets of the CRD benchmark (RepDistiller's models/wrn.py): wrn_16_1,
wrn_16_2, wrn_40_1, wrn_40_2 (``wrn_{depth}_{widen}``).

Pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, + shortcut). Where the
width changes, the shortcut is a strided 1x1 conv applied to the block's
*activated* input; otherwise it is the raw input. A final BN + ReLU precedes
the pool. No dropout (the benchmark trains with drop rate 0). Convs have no
bias and kaiming-normal (fan_out) init; the classifier bias starts at 0.

``model(x, *, train) -> (logits, feats)``, ``x``: ``[N, 32, 32, 3]``; ``k`` is
the widen factor. ``feats`` at a 32x32 input:

  stem           ``[N, 32, 32, 16]``     stem conv output (a pre-activation net
                                         has no BN/ReLU there)
  stage1         ``[N, 32, 32, 16k]``    stage output = last block's residual sum
  stage2         ``[N, 16, 16, 32k]``    (no ReLU ends a pre-activation stage)
  stage3         ``[N, 8, 8, 64k]``
  stage{i}_preact same shapes: the BN that opens the next stage (the final BN
                 for stage3) applied to stage{i}, i.e. the input of the next
                 ReLU, as RepDistiller's ``preact=True``
  pool           ``[N, 64k]``            global average pool of relu(stage3_preact)

Logical axis names (see kdlab.models.layers): conv kernels ``(None, None, "conv_in",
"channels")``, batch-norm scale/bias ``("channels",)``, the classifier ``fc``
kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register


class WideBlock(nnx.Module):
  """Pre-activation basic block: ``[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch]``."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
    self.bn1 = layers.batch_norm(in_ch, axis=layers.CHANNELS, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, stride=stride, rngs=rngs)
    self.bn2 = layers.batch_norm(out_ch, axis=layers.CHANNELS, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, rngs=rngs)
    self.shortcut = (layers.conv(in_ch, out_ch, 1, stride=stride, rngs=rngs)
                     if stride != 1 or in_ch != out_ch else None)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(out, bn1(x))``: the block output and its opening pre-activation."""
    preact = self.bn1(x, use_running_average=not train)
    a = nnx.relu(preact)
    h = nnx.relu(self.bn2(self.conv1(a), use_running_average=not train))
    h = self.conv2(h)
    return h + (x if self.shortcut is None else self.shortcut(a)), preact


class WideResNet(nnx.Module):
  """WRN-depth-k for 32x32 inputs. See the module docstring for ``feats``."""

  def __init__(self, depth: int, widen: int, *, num_classes: int = 100, rngs: nnx.Rngs):
    if (depth - 4) % 6:
      raise ValueError(f"depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    self.stem = layers.conv(3, 16, 3, rngs=rngs)
    stages = []
    in_ch = 16
    for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
      blocks = []
      for j in range(n):
        blocks.append(WideBlock(in_ch, width, 2 if i > 0 and j == 0 else 1, rngs=rngs))
        in_ch = width
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.bn = layers.batch_norm(in_ch, axis=layers.CHANNELS, rngs=rngs)
    self.fc = layers.linear(in_ch, num_classes, bias_init=layers.zeros, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    h = self.stem(x)
    feats = {"stem": h}
    for i, stage in enumerate(self.stages, start=1):
      for j, block in enumerate(stage):
        h, preact = block(h, train=train)
        if i > 1 and j == 0:
          # The next stage's opening BN is the pre-activation of the previous stage.
          feats[f"stage{i - 1}_preact"] = preact
      feats[f"stage{i}"] = h
    preact = self.bn(h, use_running_average=not train)
    feats[f"stage{len(self.stages)}_preact"] = preact
    h = layers.global_avg_pool(nnx.relu(preact))
    feats["pool"] = h
    return self.fc(h), feats


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register(f"wrn_{_depth}_{_widen}")(functools.partial(WideResNet, _depth, _widen))
