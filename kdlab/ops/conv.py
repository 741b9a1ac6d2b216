"""2-D convolution with its weight gradient computed as matrix products (a ``jax.custom_vjp``).

``conv2d(x, w)``: ``x [N, H, W, C_in]`` (NHWC), ``w [KH, KW, C_in / groups, C_out]`` (HWIO),
explicit PyTorch-style padding ``((top, bottom), (left, right))``, stride, groups.

The forward pass and the input gradient are XLA's own (``lax.conv_general_dilated`` and its
transpose). The weight gradient is a sum over kernel taps: with ``x_p`` the padded input and
``x_ij = x_p[:, i::s, j::s, :]`` cropped to the output size (the input pixels that tap
``(i, j)`` sees),

  dL/dw[i, j] = x_ij.reshape(-1, C_in)^T @ dy.reshape(-1, C_out)        ([C_in, C_out])

(per group for grouped convs). That is the same sum as XLA's in another order: results agree to
float32 rounding (tests/test_conv_op.py).

XLA:CPU lowers a weight gradient as a convolution whose "kernel" is the whole output map, after
transposing both operands. On jax 0.12 (YNNPACK kernels) that is 3-12x slower than the matrix
products for 1x1 kernels and for kernels over a few input channels (an RGB stem), but faster
than them for 3x3 kernels over 32+ channels, where the taps' shifted copies of the input cost
more than they save (benchmarks/README.md, "KD step"). Hence three implementations:

  "xla"     ``lax.conv_general_dilated`` everywhere.
  "matmul"  the custom VJP everywhere.
  "auto"    the custom VJP for ungrouped 1x1 kernels and kernels over <= 4 input channels,
            XLA elsewhere. Opt-in: its KD-step gain was within the noise of our measurements
            (student step 1-10% faster), and it gives up forward-mode differentiation.

Which one the zoo's convolutions use (``kdlab.models.layers.conv``): ``KDLAB_CONV_IMPL`` in the
environment, else :func:`use_impl` around model construction, else :data:`DEFAULT_IMPL` for the
platform. The choice is fixed when a model is built; parameters and numerics are the same
either way, so checkpoints move freely between them. A ``custom_vjp`` has no forward-mode
derivative: for ``jax.jvp``/``jax.jacfwd`` through a zoo model, build it with
``KDLAB_CONV_IMPL=xla``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "matmul", "auto")
ENV_VAR = "KDLAB_CONV_IMPL"
# Per backend, measured with benchmarks/kd_step.py (benchmarks/README.md); other backends get "xla".
DEFAULT_IMPL = {"cpu": "xla"}
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_override: list[str] = []

Padding = tuple[tuple[int, int], tuple[int, int]]


def default_impl() -> str:
  """The implementation new models get: ``KDLAB_CONV_IMPL``, else :func:`use_impl`, else the platform's."""
  env = os.environ.get(ENV_VAR)
  if env:
    return _check_impl(env, ENV_VAR)
  if _override:
    return _override[-1]
  return DEFAULT_IMPL.get(jax.default_backend(), "xla")


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
  """Models built inside use convolution ``impl`` (see :func:`conv_function`) unless ``KDLAB_CONV_IMPL`` is set."""
  _override.append(_check_impl(impl, "impl"))
  try:
    yield
  finally:
    _override.pop()


def conv_function(impl: str, kernel_size: Sequence[int], in_features: int, groups: int = 1) -> Any:
  """The ``conv_general_dilated`` a conv layer of this shape calls under ``impl``.

  "xla": ``lax.conv_general_dilated``. "matmul": :func:`conv_general_dilated` (matmul weight
  gradient). "auto": the matmul weight gradient only where it measured faster than XLA:CPU's
  (ungrouped 1x1 kernels, and ungrouped kernels over at most 4 input channels such as an RGB
  stem), XLA's elsewhere.
  """
  _check_impl(impl, "impl")
  small = all(k == 1 for k in kernel_size) or in_features <= 4
  if impl == "matmul" or (impl == "auto" and groups == 1 and small):
    return conv_general_dilated
  return lax.conv_general_dilated


def _check_impl(impl: str, field: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"{field}={impl!r}: unknown convolution implementation; choose one of {', '.join(IMPLS)}")
  return impl


def conv2d(x: jax.Array, w: jax.Array, *, strides: int | Sequence[int] = 1,
           padding: int | Sequence[tuple[int, int]] = 0, groups: int = 1, precision: Any = None) -> jax.Array:
  """``[N, H, W, C_in] x [KH, KW, C_in / groups, C_out] -> [N, H', W', C_out]``; see the module docstring.

  ``padding``: an int (the same on every side) or ``((top, bottom), (left, right))``.

  Example::

    y = conv2d(x, w, strides=2, padding=1)   # PyTorch's Conv2d(..., 3, stride=2, padding=1)
  """
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"conv2d takes x [N, H, W, C] and w [KH, KW, C_in, C_out], got shapes {x.shape} and {w.shape}")
  if x.shape[-1] != w.shape[2] * groups:
    raise ValueError(f"x has {x.shape[-1]} channels but w expects {w.shape[2]} x groups={groups}")
  if w.shape[3] % groups:
    raise ValueError(f"w's {w.shape[3]} output channels are not divisible by groups={groups}")
  s = (strides, strides) if isinstance(strides, int) else tuple(int(v) for v in strides)
  p = ((padding, padding),) * 2 if isinstance(padding, int) else tuple((int(a), int(b)) for a, b in padding)
  return _conv(x, w, s, p, int(groups), precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
  """Drop-in for ``lax.conv_general_dilated`` (``nnx.Conv(conv_general_dilated=...)``).

  Undilated 2-D NHWC/HWIO convolutions go through :func:`conv2d`; anything else to XLA unchanged.
  """
  def plain() -> jax.Array:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type, **kwargs)

  if (lhs.ndim != 4 or batch_group_count != 1 or preferred_element_type is not None
      or any(v is not None for v in kwargs.values())
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))):
    return plain()
  try:
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
      return plain()
  except (TypeError, ValueError):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return conv2d(lhs, rhs, strides=tuple(window_strides), padding=tuple(tuple(p) for p in padding),
                groups=feature_group_count, precision=precision)


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding, groups: int,
              precision: Any) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMENSION_NUMBERS,
                                  feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, groups, precision):
  return _xla_conv(x, w, strides, padding, groups, precision)


def _conv_fwd(x, w, strides, padding, groups, precision):
  return _xla_conv(x, w, strides, padding, groups, precision), (x, w)


def _conv_bwd(strides, padding, groups, precision, res, dy):
  x, w = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, groups, precision), x)
  (dx,) = input_vjp(dy)
  return dx, weight_grad(x, dy, w.shape, strides, padding, groups, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                padding: Padding, groups: int = 1, precision: Any = None) -> jax.Array:
  """dL/dw of ``conv2d(x, w)`` given ``dy = dL/dy``: one matrix product per kernel tap.

  ``x [N, H, W, C_in]``, ``dy [N, H', W', C_out]`` -> ``[KH, KW, C_in / groups, C_out]``.
  """
  kh, kw, cin_g, cout = kernel_shape
  n, ho, wo, _ = dy.shape
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  m = n * ho * wo
  dy_t = dy.reshape(m, groups, cout // groups)
  taps = []
  for i in range(kh):
    for j in range(kw):
      x_ij = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                       (1, sh, sw, 1)).reshape(m, groups, cin_g)
      if groups == 1:  # [C_in, C_out]: contract over the m = N * H' * W' output pixels.
        taps.append(lax.dot_general(x_ij[:, 0], dy_t[:, 0], (((0,), (0,)), ((), ())), precision=precision))
      else:  # [G, C_in/G, C_out/G], the same per group.
        g = lax.dot_general(x_ij, dy_t, (((0,), (0,)), ((1,), (1,))), precision=precision)
        taps.append(jnp.transpose(g, (1, 0, 2)).reshape(cin_g, cout))
  return jnp.stack(taps).reshape(kh, kw, cin_g, cout).astype(x.dtype)
