"""Building blocks shared by the CIFAR zoo. All tensors are NHWC.

The zoo reproduces PyTorch reference architectures (RepDistiller, the CRD
benchmark), so the initializers and the batch-norm constants here are the
PyTorch ones: matching them keeps published training recipes (learning rate,
weight decay, epochs) transferable.

Logical axis names (``nnx.get_partition_spec``; ``kdlab.mesh`` maps them to mesh axes):

  conv kernel ``[kh, kw, in / groups, out]``  ``(None, None, "conv_in", "channels")``
  conv bias ``[out]``                          ``("channels",)``
  batch-norm scale, bias ``[C]``               ``("channels",)`` (with ``axis=CHANNELS``)
  classifier kernel ``[C, classes]``           ``("channels", None)`` (with ``axes=HEAD_AXES``)
  classifier bias ``[classes]``                ``(None,)``

Batch-norm running statistics are not parameters and carry no names (replicated). Built
under a mesh (``jax.set_mesh``) the named parameters are created sharded, which needs a rule
in ``nnx.logical_axis_rules`` for every name (``None`` = replicated); without a mesh the names
are only metadata. :func:`batch_norm` and :func:`linear` name nothing unless asked (the
connectors of ``kdlab.models.connectors`` use them unnamed).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.ops import conv as conv_ops

Initializer = jax.nn.initializers.Initializer

# ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``; also what the
# reference's hand-written ``normal_(0, sqrt(2 / (k * k * out)))`` computes.
# Untruncated, unlike ``jax.nn.initializers.he_normal``.
kaiming_fan_out: Initializer = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Conv/Linear weight init, ``kaiming_uniform_(a=sqrt(5))``:
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default: Initializer = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

zeros: Initializer = jax.nn.initializers.zeros

CHANNELS = "channels"  # a layer's output channels (features)
CONV_IN = "conv_in"  # a conv kernel's input channels
HEAD_AXES = (CHANNELS, None)  # a classifier's kernel: channels in, classes out


def eager_sharding() -> contextlib.AbstractContextManager:
  """Flax's eager sharding on under a mesh (parameters born sharded by their names), off without
  one (names kept as metadata: flax would otherwise refuse named parameters outside a mesh)."""
  return nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty)


def _names(axes: tuple[str | None, ...] | None) -> dict[str, Any]:
  return {} if axes is None else {"out_sharding": tuple(axes)}


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
         use_bias: bool = False, kernel_init: Initializer = kaiming_fan_out,
         impl: str | None = None, rngs: nnx.Rngs) -> nnx.Conv:
  """Square convolution with PyTorch's symmetric ``kernel_size // 2`` padding.

  Explicit padding, not ``"SAME"``: for stride 2 on even sizes ``"SAME"`` pads
  only the bottom/right and would shift every strided feature map by a pixel.

  ``impl``: how the weight gradient is computed, "xla", "matmul" or "auto" (see
  :func:`kdlab.ops.conv.conv_function`); ``None`` takes
  :func:`kdlab.ops.conv.default_impl` (``KDLAB_CONV_IMPL``). The parameters, the
  forward pass and the gradients' values are the same for all.

  The kernel is named ``(None, None, "conv_in", "channels")``, the bias ``("channels",)``.
  """
  pad = kernel_size // 2
  impl = conv_ops.default_impl() if impl is None else impl
  with eager_sharding():
    return nnx.Conv(in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
                    padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                    use_bias=use_bias, kernel_init=kernel_init, bias_init=zeros, rngs=rngs,
                    conv_general_dilated=conv_ops.conv_function(impl, (kernel_size, kernel_size), in_ch, groups),
                    kernel_metadata=_names((None, None, CONV_IN, CHANNELS)), bias_metadata=_names((CHANNELS,)))


def batch_norm(num_features: int, *, axis: str | None = None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """Batch norm with PyTorch's defaults (its momentum 0.1 is flax's 0.9), scale 1, bias 0.

  ``axis``: the logical name of the scale and bias (the zoo's ``CHANNELS``); None names nothing.
  """
  names = _names(None if axis is None else (axis,))
  with eager_sharding():
    return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, scale_metadata=names,
                         bias_metadata=names, rngs=rngs)


def linear(in_features: int, out_features: int, *, kernel_init: Initializer = torch_default,
           bias_init: Initializer | None = None, axes: tuple[str | None, str | None] | None = None,
           rngs: nnx.Rngs) -> nnx.Linear:
  """Dense layer; the bias defaults to PyTorch's init for this ``in_features``.

  ``axes``: logical names of the ``[in, out]`` kernel (the zoo's classifiers: ``HEAD_AXES``);
  the bias gets the ``out`` name. None names nothing.
  """
  if bias_init is None:
    bias_init = torch_default_bias(in_features)
  with eager_sharding():
    return nnx.Linear(in_features, out_features, kernel_init=kernel_init, bias_init=bias_init,
                      kernel_metadata=_names(axes), bias_metadata=_names(None if axes is None else axes[1:]),
                      rngs=rngs)


class ConvBN(nnx.Module):
  """Convolution then batch norm, no activation.

  ``[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch]``.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               groups: int = 1, use_bias: bool = False,
               kernel_init: Initializer = kaiming_fan_out, rngs: nnx.Rngs):
    self.conv = conv(in_ch, out_ch, kernel_size, stride=stride, groups=groups,
                     use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)
    self.bn = batch_norm(out_ch, axis=CHANNELS, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.bn(self.conv(x), use_running_average=not train)


def run_stages(h: jax.Array, stages: Any, feats: dict[str, jax.Array], *, train: bool) -> jax.Array:
  """Runs stages of blocks ``block(h, train) -> (h, preact)``, recording ``stage{i}`` and ``stage{i}_preact``."""
  for i, stage in enumerate(stages, start=1):
    for block in stage:
      h, preact = block(h, train=train)
    feats[f"stage{i}_preact"] = preact
    feats[f"stage{i}"] = h
  return h


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``[N, H, W, C] -> [N, C]``.

  The references pool with fixed windows sized for 32x32 inputs
  (``AvgPool2d(8)``, ``avg_pool2d(out, 4)``...); on those inputs the window
  covers the whole map, so this is the same op, and it still yields ``[N, C]``
  on other input sizes.
  """
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle: channel ``g * (C/groups) + k`` moves to ``k * groups + g``.

  ``[N, H, W, C] -> [N, H, W, C]``, ``C`` divisible by ``groups``.
  """
  if groups == 1:
    return x
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)
