"""Be Your Own Teacher (Zhang et al. 2019): auxiliary exits on any zoo model's stage taps.

``create("byot", base="resnet8", exits=("stage1", "stage2"), num_classes=100)`` wraps the zoo
model ``base``. Each exit takes a named tap ``[N, H, W, C]``, runs a bottleneck of stride-2
3x3 conv + BN + ReLU layers down to the deepest stage's spatial size and width, pools it and
classifies it. The wrapped model's own classifier is the deepest exit.

``model(x, *, train) -> (logits, feats)``: ``logits`` are the deepest exit's; ``feats`` holds the
base model's taps plus, for exit ``i`` (1-based, shallow to deep), ``exit{i}_logits``
``[N, num_classes]`` and ``exit{i}_feat`` ``[N, D]`` (``D`` = the base's ``pool`` width, so the
feature loss to ``pool`` needs no connector). The evaluation reports each exit's accuracy and the
ensemble of all exits (``test/accuracy_exit{i}``, ``test/accuracy_exits_ensemble``).

The exits' parameters carry the zoo's logical axis names (kdlab.models.layers): conv kernels
``(None, None, "conv_in", "channels")``, batch-norm scale/bias ``("channels",)``, the exit
classifier kernel ``("channels", None)`` and bias ``(None,)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models import layers, registry


class Exit(nnx.Module):
  """Bottleneck ``[N, H, W, C] -> [N, D]`` (pooled) and a classifier ``[N, D] -> [N, classes]``."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
    (h, _, c), (hd, _, cd) = in_shape, out_shape
    downsample = int(round(math.log2(h / hd))) if h > hd else 0
    widths = [c] + [cd] * max(downsample, 1)
    self.convs = nnx.List([layers.ConvBN(a, b, 3, stride=2 if i < downsample else 1, rngs=rngs)
                           for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
    self.head = layers.linear(cd, num_classes, axes=layers.HEAD_AXES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    for conv in self.convs:
      x = nnx.relu(conv(x, train=train))
    feat = layers.global_avg_pool(x)
    return self.head(feat), feat


class BYOT(nnx.Module):
  """A zoo model with auxiliary exits on ``exits`` (tap names, shallow to deep)."""

  def __init__(self, base: nnx.Module, exits: Sequence[str], num_classes: int, input_shape: Sequence[int],
               *, rngs: nnx.Rngs):
    self.base = base
    self.exit_taps = tuple(exits)
    _, feats = nnx.eval_shape(lambda: base(jnp.zeros((1, *input_shape)), train=False))
    stages = sorted(k for k in feats if k.startswith("stage") and not k.endswith("_preact"))
    deepest = feats[stages[-1]].shape[1:]
    missing = [t for t in exits if t not in feats]
    if missing:
      raise ValueError(f"exits: {missing} are not taps of the base model; taps are {sorted(feats)}")
    if feats["pool"].shape[-1] != deepest[-1]:
      raise ValueError("exits: the base model's pool width differs from its last stage's width")
    self.exits = nnx.List([Exit(feats[t].shape[1:], deepest, num_classes, rngs=rngs) for t in exits])

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits, feats = self.base(x, train=train)
    feats = dict(feats)
    for i, (tap, exit_) in enumerate(zip(self.exit_taps, self.exits), start=1):
      feats[f"exit{i}_logits"], feats[f"exit{i}_feat"] = exit_(feats[tap], train=train)
    return logits, feats


@registry.register("byot")
def byot(*, rngs: nnx.Rngs, base: str = "resnet8", exits: Sequence[str] = ("stage1", "stage2"),
         num_classes: int = 100, input_shape: Sequence[int] = (32, 32, 3), **base_kwargs) -> BYOT:
  """``create("byot", base="resnet8", exits=("stage1", "stage2"), num_classes=100)``."""
  model = registry.create(base, rngs=rngs, num_classes=num_classes, **base_kwargs)
  return BYOT(model, exits, num_classes, input_shape, rngs=rngs)
