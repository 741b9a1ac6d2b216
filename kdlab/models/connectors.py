"""Learnable connectors: the adapters distillation methods put between student and teacher taps.

A connector is an NNX module owned by one objective term (see :mod:`kdlab.objective.terms`), built from the
abstract tap shapes, stored in the learner next to the student and trained with it. Every
connector is called as ``connector(x, *, train)``; the train step uses ``train=True`` (batch
statistics, updated running averages that live in the learner's non-parameter state).

Shapes follow the zoo: NHWC ``[B, H, W, C]`` maps or ``[B, D]`` vectors. Modules and their
initialisers follow RepDistiller (HobbitLong/RepDistiller ``models/util.py`` and
``distiller_zoo``), with PyTorch's default layer initialisers unless the reference re-initialises.
Shape problems raise ``ValueError`` naming the shapes; the term builder adds the tap names.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models import layers

Shape = Sequence[int]


def _conv(in_ch: int, out_ch: int, kernel: tuple[int, int], *, stride: int = 1,
          padding: int | Sequence[tuple[int, int]] = 0, use_bias: bool = True,
          kernel_init: layers.Initializer = layers.torch_default, rngs: nnx.Rngs) -> nnx.Conv:
  """``nn.Conv2d`` with PyTorch's default init (bias ``U(+-1/sqrt(fan_in))``)."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(in_ch, out_ch, kernel, strides=stride, padding=padding, use_bias=use_bias,
                  kernel_init=kernel_init, bias_init=layers.torch_default_bias(in_ch * kernel[0] * kernel[1]),
                  rngs=rngs)


def _conv_transpose(in_ch: int, out_ch: int, kernel: int, *, stride: int, torch_padding: int,
                    rngs: nnx.Rngs) -> nnx.ConvTranspose:
  """``nn.ConvTranspose2d(kernel, stride, padding=p)``: output ``(H - 1) * stride - 2p + kernel``."""
  pad = kernel - 1 - torch_padding  # Padding of the stride-dilated input that gives torch's size.
  return nnx.ConvTranspose(in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                           kernel_init=layers.torch_default,
                           bias_init=layers.torch_default_bias(out_ch * kernel * kernel), rngs=rngs)


def _pointwise(in_ch: int, out_ch: int, *, kernel_init: layers.Initializer = layers.torch_default,
               rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free 1x1 convolution: a linear map of the last axis (so it also works on ``[B, D]``)."""
  return nnx.Linear(in_ch, out_ch, use_bias=False, kernel_init=kernel_init, rngs=rngs)


def _bn(x: jax.Array, bn: nnx.BatchNorm, train: bool) -> jax.Array:
  return bn(x, use_running_average=not train)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def avg_pool_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Average-pools NHWC ``x`` to ``size`` (integer factors: equals PyTorch's adaptive pooling)."""
  _, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  return x.reshape(x.shape[0], size[0], h // size[0], size[1], w // size[1], c).mean(axis=(2, 4))


def poolable(big: Shape, small: Shape) -> bool:
  """Whether NHWC spatial size ``big`` pools to ``small`` by integer factors."""
  return all(b >= s > 0 and b % s == 0 for b, s in zip(big[1:3], small[1:3]))


class FitNetRegressor(nnx.Module):
  """FitNet's hint regressor (RepDistiller ``ConvReg``): student tap -> the teacher tap's shape.

  Maps ``[B, Hs, Ws, Cs]`` to ``[B, Ht, Wt, Ct]`` with a 3x3 stride-2 conv when ``Hs = 2 Ht``,
  a 4x4 stride-2 transposed conv when ``2 Hs = Ht``, otherwise (``Hs >= Ht``) a valid conv
  of kernel ``(1 + Hs - Ht, 1 + Ws - Wt)`` (a 1x1 conv at equal sizes); then BN and ReLU
  (``relu=False``: BN only, RepDistiller's AB ``Connector`` between maps of different sizes).
  Vectors ``[B, Ds] -> [B, Dt]`` get a linear layer.
  """

  def __init__(self, s_shape: Shape, t_shape: Shape, *, relu: bool = True, rngs: nnx.Rngs):
    s_shape, t_shape = tuple(s_shape), tuple(t_shape)
    self.relu = relu
    if len(s_shape) == 2 and len(t_shape) == 2:
      self.proj, self.bn = layers.linear(s_shape[1], t_shape[1], rngs=rngs), None
      return
    if len(s_shape) != 4 or len(t_shape) != 4:
      raise ValueError(f"a FitNet regressor maps [B, D] to [B, D'] or NHWC to NHWC, got {s_shape} -> {t_shape}")
    (_, sh, sw, sc), (_, th, tw, tc) = s_shape, t_shape
    if (sh, sw) == (2 * th, 2 * tw):
      proj = _conv(sc, tc, (3, 3), stride=2, padding=1, rngs=rngs)
    elif (2 * sh, 2 * sw) == (th, tw):
      proj = _conv_transpose(sc, tc, 4, stride=2, torch_padding=1, rngs=rngs)
    elif sh >= th and sw >= tw:
      proj = _conv(sc, tc, (1 + sh - th, 1 + sw - tw), rngs=rngs)
    else:
      raise ValueError(f"no FitNet regressor from spatial size {(sh, sw)} to {(th, tw)} "
                       f"(the student map may be larger, or exactly half the size)")
    self.proj, self.bn = proj, layers.batch_norm(tc, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.proj(x)
    if self.bn is None:
      return x
    x = _bn(x, self.bn, train)
    return nnx.relu(x) if self.relu else x


class Embed(nnx.Module):
  """CRD's embedding head (RepDistiller ``Embed``): flatten, linear to ``dim``, L2-normalise.

  ``[B, ...] -> [B, dim]`` unit rows.
  """

  def __init__(self, in_shape: Shape, dim: int, *, rngs: nnx.Rngs):
    self.linear = layers.linear(math.prod(in_shape[1:]), dim, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    return _l2_normalize(self.linear(_flat(x)))


class EmbedPair(nnx.Module):
  """Embedding heads for both sides (CRD, InfoNCE, CC): ``student(x)``, ``teacher(x)``."""

  def __init__(self, s_shape: Shape, t_shape: Shape, dim: int, *, rngs: nnx.Rngs):
    self.student = Embed(s_shape, dim, rngs=rngs)
    self.teacher = Embed(t_shape, dim, rngs=rngs)


class VIDRegressor(nnx.Module):
  """VID's mean regressor and variance (RepDistiller ``VIDLoss``).

  ``1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv`` (no biases; ``mid`` channels, the teacher's by
  default) from the student's ``Cs`` channels to the teacher's ``Ct``, on the last axis of
  ``[B, ..., Cs]``, and ``log_scale [Ct]`` initialised so that
  ``softplus(log_scale) + eps = init_var`` (RepDistiller: 5).
  """

  def __init__(self, s_channels: int, t_channels: int, *, mid: int | None = None, init_var: float = 5.0,
               eps: float = 1e-5, rngs: nnx.Rngs):
    mid = mid or t_channels
    self.conv1 = _pointwise(s_channels, mid, rngs=rngs)
    self.conv2 = _pointwise(mid, mid, rngs=rngs)
    self.conv3 = _pointwise(mid, t_channels, rngs=rngs)
    self.log_scale = nnx.Param(jnp.full((t_channels,), math.log(math.expm1(init_var - eps)), jnp.float32))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    return self.conv3(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))


class ABConnector(nnx.Module):
  """AB's connector (RepDistiller ``Connector``): 1x1 conv (no bias) + BN, ``Cs -> Ct`` channels.

  The conv uses RepDistiller's ``normal(0, sqrt(2 / (k * k * out)))`` init; spatial sizes must match.
  """

  def __init__(self, s_channels: int, t_channels: int, *, rngs: nnx.Rngs):
    self.conv = _pointwise(s_channels, t_channels, kernel_init=layers.kaiming_fan_out, rngs=rngs)
    self.bn = layers.batch_norm(t_channels, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return _bn(self.conv(x), self.bn, train)


def _leaky(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, 0.1)


class _ConvStack(nnx.Module):
  """3x3 same-size convs, each followed by optional BN and LeakyReLU(0.1)."""

  def __init__(self, channels: Sequence[int], *, use_bn: bool, rngs: nnx.Rngs):
    pairs = list(zip(channels[:-1], channels[1:]))
    # RepDistiller's decoder uses ConvTranspose2d(3, stride=1, padding=1): at stride 1 that is a
    # 3x3 "same" convolution with a flipped kernel, the same function class, so a plain conv
    # (much cheaper to compile on CPU) stands in for it.
    self.convs = nnx.List([_conv(a, b, (3, 3), padding=1, rngs=rngs) for a, b in pairs])
    self.bns = nnx.List([layers.batch_norm(b, rngs=rngs) for _, b in pairs]) if use_bn else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.bns is not None:
        x = _bn(x, self.bns[i], train)
      x = _leaky(x)
    return x


class Paraphraser(nnx.Module):
  """FT's teacher-side autoencoder (RepDistiller ``Paraphraser``, no BN).

  ``encode: [B, H, W, Ct] -> [B, H, W, int(rate * Ct)]`` (the factor) with three 3x3 convs;
  ``decode`` mirrors it back to ``Ct`` channels.
  """

  def __init__(self, t_channels: int, *, rate: float = 0.5, rngs: nnx.Rngs):
    factor = max(1, int(t_channels * rate))
    self.encoder = _ConvStack((t_channels, t_channels, factor, factor), use_bn=False, rngs=rngs)
    self.decoder = _ConvStack((factor, factor, t_channels, t_channels), use_bn=False, rngs=rngs)

  def encode(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.encoder(x, train=train)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """The reconstruction ``decode(encode(x))``."""
    return self.decoder(self.encode(x, train=train), train=train)


class Translator(nnx.Module):
  """FT's student-side encoder (RepDistiller ``Translator``): three 3x3 convs with BN, ``Cs -> int(rate * Ct)``."""

  def __init__(self, s_channels: int, t_channels: int, *, rate: float = 0.5, rngs: nnx.Rngs):
    factor = max(1, int(t_channels * rate))
    self.encoder = _ConvStack((s_channels, s_channels, factor, factor), use_bn=True, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.encoder(x, train=train)


class FactorTransfer(nnx.Module):
  """FT's two connectors: ``paraphraser`` (teacher side) and ``translator`` (student side)."""

  def __init__(self, s_shape: Shape, t_shape: Shape, *, rate: float = 0.5, rngs: nnx.Rngs):
    # Spatial sizes may differ: the term compares the factors at a common size (or refuses).
    if len(s_shape) != 4 or len(t_shape) != 4:
      raise ValueError(f"factor transfer needs NHWC maps, got {tuple(s_shape)} and {tuple(t_shape)}")
    self.paraphraser = Paraphraser(t_shape[-1], rate=rate, rngs=rngs)
    self.translator = Translator(s_shape[-1], t_shape[-1], rate=rate, rngs=rngs)


class Stack(nnx.Module):
  """One connector per tap pair of a multi-layer term: ``stack[i]``."""

  def __init__(self, connectors: Sequence[nnx.Module | None]):
    self.items = nnx.List(list(connectors))

  def __getitem__(self, i: int) -> nnx.Module | None:
    return self.items[i]

  def __len__(self) -> int:
    return len(self.items)
