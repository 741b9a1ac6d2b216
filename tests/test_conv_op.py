"""kdlab.ops.conv: the matmul weight-gradient convolution equals XLA's, alone and inside a zoo model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from kdlab import models
from kdlab.models import layers
from kdlab.ops import conv as conv_ops

RTOL, ATOL = 1e-5, 1e-5


def _xla(x, w, strides, padding, groups):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


CASES = [  # (N, H, W, C_in, C_out, K, stride, padding, groups)
    (2, 8, 8, 3, 4, 3, 1, 1, 1),
    (2, 8, 8, 4, 6, 3, 2, 1, 1),
    (3, 7, 9, 4, 5, 3, 2, 1, 1),   # odd sizes with stride 2
    (2, 8, 8, 4, 8, 1, 2, 0, 1),   # strided 1x1 shortcut
    (2, 6, 6, 4, 4, 1, 1, 0, 1),
    (1, 9, 9, 2, 3, 5, 1, 2, 1),
    (2, 8, 8, 3, 4, 3, 1, ((0, 2), (1, 0)), 1),  # asymmetric padding
    (2, 8, 8, 3, 4, 3, 3, 0, 1),   # stride 3, no padding
    (2, 8, 8, 4, 6, 3, 1, 1, 2),   # grouped
    (2, 8, 8, 6, 6, 3, 2, 1, 6),   # depthwise, strided
]


@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,padding,groups", CASES)
def test_conv2d_matches_xla_forward_and_both_gradients(n, h, w, cin, cout, k, stride, padding, groups):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, h, w, cin))
  kernel = jax.random.normal(kw, (k, k, cin // groups, cout))
  pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  strides = (stride, stride)
  ours = lambda x, w: conv_ops.conv2d(x, w, strides=stride, padding=padding, groups=groups)
  ref = lambda x, w: _xla(x, w, strides, pad, groups)
  y, y_ref = ours(x, kernel), ref(x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
  dy = jax.random.normal(ky, y.shape)
  grads = jax.jit(lambda x, w: jax.vjp(ours, x, w)[1](dy))(x, kernel)
  grads_ref = jax.vjp(ref, x, kernel)[1](dy)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=ATOL * float(jnp.max(jnp.abs(g_ref))))


def test_conv2d_check_grads():
  x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2))
  w = jax.random.normal(jax.random.key(2), (3, 3, 2, 3))
  f = lambda x, w: conv_ops.conv2d(x, w, strides=2, padding=1)
  check_grads(f, (x, w), order=1, modes=("rev",), rtol=2e-2)


def test_drop_in_routes_only_supported_convs():
  x = jnp.ones((1, 6, 6, 2))
  w = jnp.ones((3, 3, 2, 4))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  y = conv_ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
  np.testing.assert_allclose(y, jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))
  # Dilated convs go to XLA unchanged.
  y = conv_ops.conv_general_dilated(x, w, (1, 1), "VALID", rhs_dilation=(2, 2), dimension_numbers=dn)
  assert y.shape == (1, 2, 2, 4)


def test_impl_switch_and_env(monkeypatch):
  monkeypatch.delenv(conv_ops.ENV_VAR, raising=False)
  with conv_ops.use_impl("matmul"):
    assert conv_ops.default_impl() == "matmul"
    assert layers.conv(2, 3, 3, rngs=nnx.Rngs(0)).conv_general_dilated is conv_ops.conv_general_dilated
  with conv_ops.use_impl("xla"):
    assert layers.conv(2, 3, 3, rngs=nnx.Rngs(0)).conv_general_dilated is jax.lax.conv_general_dilated
    monkeypatch.setenv(conv_ops.ENV_VAR, "matmul")
    assert conv_ops.default_impl() == "matmul"  # The environment wins.
  monkeypatch.delenv(conv_ops.ENV_VAR)
  with conv_ops.use_impl("auto"):  # The matmul weight gradient for 1x1 kernels and RGB stems only.
    assert layers.conv(8, 3, 1, rngs=nnx.Rngs(0)).conv_general_dilated is conv_ops.conv_general_dilated
    assert layers.conv(3, 8, 3, rngs=nnx.Rngs(0)).conv_general_dilated is conv_ops.conv_general_dilated
    assert layers.conv(8, 8, 3, rngs=nnx.Rngs(0)).conv_general_dilated is jax.lax.conv_general_dilated
    assert layers.conv(8, 8, 1, groups=2, rngs=nnx.Rngs(0)).conv_general_dilated is jax.lax.conv_general_dilated
  monkeypatch.setenv(conv_ops.ENV_VAR, "cudnn")
  with pytest.raises(ValueError, match="KDLAB_CONV_IMPL"):
    conv_ops.default_impl()


def _grads(impl: str):
  with conv_ops.use_impl(impl):
    model = models.create("resnet8", num_classes=10, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.to_pure_dict(rest)
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  labels = jnp.array([1, 7])

  def loss(p):
    logits, feats = nnx.merge(graphdef, p, rest)(x, train=True)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
    return ce + 1e-2 * jnp.mean(feats["stage2"] ** 2)

  return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(params)), nnx.to_pure_dict(params)


def test_zoo_model_gradients_equal_with_matmul_conv(monkeypatch):
  monkeypatch.delenv(conv_ops.ENV_VAR, raising=False)
  (loss, grads), params = _grads("matmul")  # Every conv through the custom VJP ("auto" uses a subset).
  (loss_ref, grads_ref), params_ref = _grads("xla")
  # Same parameter names, shapes and initial values: checkpoints are interchangeable.
  assert jax.tree.structure(params) == jax.tree.structure(params_ref)
  jax.tree.map(np.testing.assert_array_equal, params, params_ref)
  np.testing.assert_allclose(loss, loss_ref, rtol=RTOL)
  flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)
  for (path, g), g_ref in zip(flat, flat_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
