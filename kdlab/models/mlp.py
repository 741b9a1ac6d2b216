"""Multilayer perceptron of Hinton et al. 2015's MNIST experiments."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models.registry import register


class MLP(nnx.Module):
  """ReLU MLP on flattened inputs.

  ``model(x [B, ...], train=...) -> (logits [B, num_classes], feats)`` with
  feats ``hidden{i}`` ``[B, hidden[i-1]]`` (post-ReLU, i = 1..len(hidden)) and
  ``pool`` (the last hidden layer, the classifier's input).
  """

  def __init__(self, *, in_features: int, hidden: Sequence[int], num_classes: int,
               dropout: float, input_dropout: float, rngs: nnx.Rngs):
    sizes = (in_features, *hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.input_dropout = nnx.Dropout(input_dropout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    h = self.input_dropout(x.reshape(x.shape[0], -1), deterministic=not train)
    feats = {}
    for i, layer in enumerate(self.layers, start=1):
      h = jax.nn.relu(layer(h))
      feats[f"hidden{i}"] = h
      h = self.dropout(h, deterministic=not train)
    feats["pool"] = feats[f"hidden{len(self.layers)}"] if len(self.layers) else h
    return self.head(h), feats


@register("mlp")
def mlp(*, rngs: nnx.Rngs, in_features: int = 784, hidden: Sequence[int] = (1200, 1200),
        num_classes: int = 10, dropout: float = 0.0, input_dropout: float = 0.0) -> MLP:
  """``create("mlp", hidden=(1200, 1200), num_classes=10, dropout=0.5)``."""
  for name, rate in (("dropout", dropout), ("input_dropout", input_dropout)):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {rate}")
  return MLP(in_features=in_features, hidden=tuple(hidden), num_classes=num_classes,
             dropout=dropout, input_dropout=input_dropout, rngs=rngs)
