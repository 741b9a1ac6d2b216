"""Tests for the CIFAR zoo (kdlab.models.zoo): parameter counts equal the
reference's, feats keys and shapes match docs/models.md, and every model runs
forward and backward in train mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdlab.models import registry, zoo  # noqa: F401  (registers the zoo)

# Trainable parameters at num_classes=100 of the reference models: HobbitLong/RepDistiller at
# commit b84f547c5db6a35318d4671d7d5c4de74c822403, models/__init__.py
# `model_dict[name](num_classes=100)`, counted with torch 2.13.0 as
# `sum(p.numel() for p in model.parameters() if p.requires_grad)`
# (conv/linear weights and biases, BN weight and bias; running stats excluded).
REFERENCE_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}
ZOO = list(REFERENCE_PARAMS)

# (stem, stages, pool) feature shapes at a 32x32 input, without the batch axis, as in
# docs/models.md; stage{i}_preact has stage{i}'s shape.
_CIFAR = ((32, 32, 16), ((32, 32, 16), (16, 16, 32), (8, 8, 64)), (64,))
_CIFAR_X4 = ((32, 32, 32), ((32, 32, 64), (16, 16, 128), (8, 8, 256)), (256,))
_VGG = ((32, 32, 64), ((16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)), (512,))


def _wrn(k: int):
  return (32, 32, 16), ((32, 32, 16 * k), (16, 16, 32 * k), (8, 8, 64 * k)), (64 * k,)


FEAT_SHAPES = {
    **{name: _CIFAR for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                                 "resnet56", "resnet110")},
    "resnet8x4": _CIFAR_X4,
    "resnet32x4": _CIFAR_X4,
    "ResNet50": ((32, 32, 64), ((32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)), (2048,)),
    "wrn_16_1": _wrn(1), "wrn_40_1": _wrn(1), "wrn_16_2": _wrn(2), "wrn_40_2": _wrn(2),
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ((16, 16, 16), ((16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)), (1280,)),
    "ShuffleV1": ((32, 32, 24), ((16, 16, 240), (8, 8, 480), (4, 4, 960)), (960,)),
    "ShuffleV2": ((32, 32, 24), ((16, 16, 116), (8, 8, 232), (4, 4, 464)), (1024,)),
}


def expected_feats(name: str, batch: int) -> dict[str, tuple[int, ...]]:
  stem, stages, pool = FEAT_SHAPES[name]
  out = {"stem": (batch, *stem), "pool": (batch, *pool)}
  for i, shape in enumerate(stages, start=1):
    out[f"stage{i}"] = out[f"stage{i}_preact"] = (batch, *shape)
  return out


@functools.cache
def abstract_model(name: str) -> nnx.Module:
  """``name`` at 100 classes with shape-only parameters (nothing is computed or compiled)."""
  return nnx.eval_shape(lambda: registry.create(name, num_classes=100))


def test_zoo_names_are_registered():
  assert set(ZOO) <= set(registry.names())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count_matches_reference(name):
  params = jax.tree.leaves(nnx.state(abstract_model(name), nnx.Param))
  assert sum(int(np.prod(p.shape)) for p in params) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", ZOO)
def test_eval_output_shapes(name):
  # Shape-only tracing of the eval-mode call; train mode is run for real in test_forward_backward.
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  logits, feats = nnx.eval_shape(lambda m, x: m(x, train=False), abstract_model(name), x)
  assert logits.shape == (3, 100)
  assert {k: v.shape for k, v in feats.items()} == expected_feats(name, 3)


# How each model is run forward and backward, by measurement on 2 shared CPU cores. Eager dispatch
# compiles each primitive once per shape and reuses it across the many repeated blocks of
# CIFAR ResNets/WRNs/VGGs (and across the models of a family); ResNet50, MobileNetV2 and the
# ShuffleNets have mostly distinct layer shapes, where one unoptimised XLA compile of the init and
# one of the whole step are several times cheaper. Neither choice affects what is checked.
_jit_o0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                       "xla_llvm_disable_expensive_passes": True})
JITTED = {"ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"}
SLOW = {"resnet110", "ResNet50", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"}


def _loss(model: nnx.Module, x: jax.Array):
  logits, feats = model(x, train=True)
  # Every tap takes part, so a NaN/inf anywhere in a tap's backward pass shows up in the grads.
  loss = jnp.mean(jax.nn.log_softmax(logits)) + sum(jnp.mean(f**2) for f in feats.values())
  return loss, (logits, feats)


def _forward_backward(name: str, x: jax.Array):
  """Returns logits, feats, grads, and the BN running statistics before and after the step."""
  if name not in JITTED:
    model = registry.create(name, num_classes=10)
    stats_before = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    (_, (logits, feats)), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x)
    return logits, feats, grads, stats_before, jax.tree.leaves(nnx.state(model, nnx.BatchStat))

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: registry.create(name, num_classes=10)))
  state = _jit_o0(lambda: nnx.state(registry.create(name, num_classes=10)))()

  @_jit_o0
  def step(state, x):
    model = nnx.merge(graphdef, state)
    (_, (logits, feats)), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x)
    return logits, feats, grads, nnx.state(model, nnx.BatchStat)

  logits, feats, grads, stats_after = step(state, x)
  return (logits, feats, grads, jax.tree.leaves(nnx.filter_state(state, nnx.BatchStat)),
          jax.tree.leaves(stats_after))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in ZOO])
def test_forward_backward(name):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  logits, feats, grads, stats_before, stats_after = _forward_backward(name, x)
  assert logits.shape == (2, 10)
  assert np.isfinite(np.asarray(logits)).all()
  assert {k: v.shape for k, v in feats.items()} == expected_feats(name, 2)
  for key, f in feats.items():
    assert np.isfinite(np.asarray(f)).all(), key
  grad_leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(grad_leaves) == len(jax.tree.leaves(nnx.state(abstract_model(name), nnx.Param)))
  for path, g in grad_leaves:
    g = np.asarray(g)
    assert np.isfinite(g).all(), jax.tree_util.keystr(path)
    # Every conv/linear weight reaches the loss (no layer is built and left unused).
    if "kernel" in jax.tree_util.keystr(path):
      assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
  # Train mode updates the BN running statistics.
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats_before),
                                                   jax.tree.leaves(stats_after)))
