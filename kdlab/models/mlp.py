"""Multilayer perceptron of Hinton et al. 2015's MNIST experiments.

Logical axis names (``nnx.get_partition_spec``; ``kdlab.mesh`` maps them to mesh axes): each
hidden layer's kernel ``[in, out]`` is ``("hidden_in", "hidden")`` (the first layer's ``in`` is
the flattened input, e.g. 784) and its bias ``("hidden",)``; the head's kernel
``[hidden[-1], num_classes]`` is ``("hidden", None)`` (``("hidden_in", None)`` without hidden
layers) and its bias ``(None,)``. Built under a mesh (``jax.set_mesh``) the parameters are
created sharded, which needs a rule in ``nnx.logical_axis_rules`` for each name (``None`` =
replicated).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models import layers
from kdlab.models.registry import register

HIDDEN_IN, HIDDEN = "hidden_in", "hidden"


def _linear(a: int, b: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
  """flax's default ``nnx.Linear`` with its kernel named ``axes`` and its bias ``axes[1:]``."""
  with layers.eager_sharding():
    return nnx.Linear(a, b, kernel_metadata={"out_sharding": axes},
                      bias_metadata={"out_sharding": axes[1:]}, rngs=rngs)


class MLP(nnx.Module):
  """ReLU MLP on flattened inputs.

  ``model(x [B, ...], train=...) -> (logits [B, num_classes], feats)`` with
  feats ``hidden{i}`` ``[B, hidden[i-1]]`` (post-ReLU, i = 1..len(hidden)) and
  ``pool`` (the last hidden layer, the classifier's input).
  """

  def __init__(self, *, in_features: int, hidden: Sequence[int], num_classes: int,
               dropout: float, input_dropout: float, rngs: nnx.Rngs):
    sizes = (in_features, *hidden)
    self.layers = nnx.List([_linear(a, b, (HIDDEN_IN, HIDDEN), rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    # With no hidden layers the head reads the input itself.
    self.head = _linear(sizes[-1], num_classes, (HIDDEN if hidden else HIDDEN_IN, None), rngs)
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
