"""VGG with batch norm for CIFAR, as in the CRD benchmark (RepDistiller's
models/vgg.py, the ``*_bn`` variants): vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks of 3x3 conv (with bias) + BN + ReLU; 2x2 max pools between
blocks 0-1, 1-2 and 2-3 (and 3-4 only for 64x64 inputs, as the reference
does), a global average pool and a single linear classifier (the ImageNet FC
stack is removed). Convs: kaiming-normal (fan_out), bias 0; classifier
N(0, 0.01), bias 0.

``model(x, *, train) -> (logits, feats)``, ``x``: ``[N, 32, 32, 3]``. ``feats``
at a 32x32 input:

  stem            ``[N, 32, 32, 64]``   block 0 output, after its ReLU
  stage1          ``[N, 16, 16, 128]``  block 1 output, after its final ReLU
  stage2          ``[N, 8, 8, 256]``
  stage3          ``[N, 4, 4, 512]``
  stage4          ``[N, 4, 4, 512]``    (no pool before block 4 at 32x32)
  stage{i}_preact same shapes, block ``i``'s last BN before the ReLU
  pool            ``[N, 512]``          global average pool, fed to ``classifier``

Logical axis names (see kdlab.models.layers): conv kernels ``(None, None, "conv_in",
"channels")``, conv biases and batch-norm scale/bias ``("channels",)``, the ``classifier``
kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register

# Conv widths of the five blocks per depth.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _max_pool(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nnx.Module):
  """VGG-BN for 32x32 inputs. See the module docstring for ``feats``."""

  def __init__(self, widths: Sequence[Sequence[int]], *, num_classes: int = 100, rngs: nnx.Rngs):
    blocks = []
    in_ch = 3
    for block_widths in widths:
      convs = []
      for width in block_widths:
        convs.append(layers.ConvBN(in_ch, width, 3, use_bias=True, rngs=rngs))
        in_ch = width
      blocks.append(nnx.List(convs))
    self.blocks = nnx.List(blocks)
    self.classifier = layers.linear(in_ch, num_classes,
                                    kernel_init=jax.nn.initializers.normal(0.01),
                                    bias_init=layers.zeros, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``[N, H, W, 3] -> ([N, num_classes], feats)``."""
    feats = {}
    pool_before_last = x.shape[1] == 64  # the reference's quirk: one more pool for 64x64 inputs
    h = x
    for i, block in enumerate(self.blocks):
      if i in (1, 2, 3) or (i == 4 and pool_before_last):
        h = _max_pool(h)
      for conv in block[:-1]:
        h = nnx.relu(conv(h, train=train))
      preact = block[-1](h, train=train)
      h = nnx.relu(preact)
      if i == 0:
        feats["stem"] = h
      else:
        feats[f"stage{i}_preact"] = preact
        feats[f"stage{i}"] = h
    h = layers.global_avg_pool(h)
    feats["pool"] = h
    return self.classifier(h), feats


def vgg(depth: int, *, num_classes: int = 100, rngs: nnx.Rngs) -> VGG:
  """VGG-``depth`` with batch norm; ``depth`` in 8, 11, 13, 16, 19."""
  if depth not in CONFIGS:
    raise ValueError(f"depth must be one of {sorted(CONFIGS)}, got {depth}")
  return VGG(CONFIGS[depth], num_classes=num_classes, rngs=rngs)


for _depth in CONFIGS:
  register(f"vgg{_depth}")(functools.partial(vgg, _depth))
