"""Logical axis names of the CIFAR zoo and the MLP: every parameter named (metadata only: the values
are bit-identical to those before the names existed), and under a mesh the named parameters are
created sharded; gpt's stacked (``scan_layers``) blocks too."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import run_child
from kdlab import models
from kdlab.models import registry

# sha256 over (key path, bytes) of every parameter of create(name, seed=0, **kwargs), computed with
# the zoo and the MLP as they were before they had names. MobileNetV2 and ShuffleV1 (slow to build
# here) matched too when the names were added.
DIGESTS = {
    ("resnet8", ()): "37e8fff284bc63682972d5b11fe1a76384768a90ac69e1e12b53c98d76b76185",
    ("wrn_16_2", ()): "22df135495a0323bc69bb80b0429f70662b510d1cb83ddb20970f2bfa65f3f7b",
    ("vgg8", ()): "948654423d98edbd2d11e78ec14a945bca693f342f0e1e40b63d723fcb6082c5",
    ("ShuffleV2", ()): "e16970d051430fa168df3d4f692b020ecf349576c76926ce5e17a8edc7420522",
    ("mlp", ()): "86923a8f653328597724b022654ef46ab50b239737a9dd6ded61bb8feddd2caf",
    ("mlp", (("hidden", ()),)): "bf9e7dd0d5a89849e88e2d231af58016fee876c926d82aa2c68a4cac2908b714",
    ("byot", (("base", "resnet8"), ("num_classes", 10))):
        "60a9b8e9e95340aa5f44a8a80e18f2adbc83eb713e1723eb141bb190aeb4cb99",
}
ZOO_NAMES = {(None, None, "conv_in", "channels"), ("channels",), ("channels", None), (None,)}
NAMES = {"mlp": {("hidden_in", "hidden"), ("hidden",), ("hidden", None), (None,)},
         "mlp{'hidden': ()}": {("hidden_in", None), (None,)}}  # no hidden layer: the head reads the input


def _digest(model: nnx.Module) -> str:
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  h = hashlib.sha256()
  for path, value in flat:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(value).tobytes())
  return h.hexdigest()


def _names(model: nnx.Module) -> set[tuple]:
  """Every parameter's logical names (asserting each parameter has one per dimension, none twice)."""
  found = set()
  for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = v.get_metadata("out_sharding", None)
    assert names is not None and len(names) == v.get_value().ndim, (names, v.get_value().shape)
    named = [n for n in names if n is not None]
    assert len(named) == len(set(named)), names
    found.add(tuple(names))
  return found


def _id(name: str, kwargs: tuple) -> str:
  return f"{name}{dict(kwargs) or ''}"


@pytest.mark.parametrize("name, kwargs", list(DIGESTS), ids=[_id(*k) for k in DIGESTS])
def test_named_parameters_keep_their_values(name, kwargs):
  model = models.create(name, seed=0, **dict(kwargs))
  assert _digest(model) == DIGESTS[name, kwargs]
  assert _names(model) == NAMES.get(_id(name, kwargs), ZOO_NAMES)


def test_every_zoo_model_is_named():
  checked = []
  for name in sorted(set(models.names()) - {"mlp"}):
    builder = registry._REGISTRY[name]
    if not getattr(getattr(builder, "func", builder), "__module__", "").startswith("kdlab."):
      continue  # a user's model registered by another test in this process (docs/extending.md's TinyCNN)
    try:
      model = nnx.eval_shape(lambda name=name: models.create(name))
    except TypeError:  # language models need their sizes: not the zoo
      continue
    assert _names(model) == ZOO_NAMES, name
    checked.append(name)
  assert {"resnet8", "ResNet50", "wrn_40_2", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "byot"} <= set(checked)


_SHARDED = textwrap.dedent("""
  import json
  import jax
  from flax import nnx
  from kdlab import models

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = [("channels", "fsdp"), ("conv_in", None), ("hidden", "fsdp"), ("hidden_in", None),
           ("embed", "fsdp"), ("vocab", None), ("heads", None), ("mlp", None)]
  shard = lambda v: list(v.get_value().addressable_shards[0].data.shape)
  out = {}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    cnn = models.create("resnet8", seed=0, num_classes=10)
    conv = cnn.stages[1][0].conv1
    out["conv"] = [list(conv.conv.kernel.shape), shard(conv.conv.kernel)]
    out["bn"] = [shard(conv.bn.scale), shard(conv.bn.bias), str(conv.bn.mean.get_value().sharding.spec)]
    out["fc"] = [shard(cnn.fc.kernel), shard(cnn.fc.bias)]
    mlp = models.create("mlp", seed=0, hidden=(32, 16))
    out["mlp"] = [shard(mlp.layers[0].kernel), shard(mlp.layers[1].kernel), shard(mlp.layers[1].bias),
                  shard(mlp.head.kernel)]
    # Stacked blocks: no rule for "layers" is needed (that axis stays whole).
    gpt = models.create("gpt", seed=0, vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=8,
                        scan_layers=True)
    out["gpt"] = [shard(gpt.blocks.attn.query.kernel), shard(gpt.blocks.norm1.scale)]
  try:  # flax's eager sharding refuses a logical name without a rule
    with jax.set_mesh(mesh), nnx.logical_axis_rules([("channels", "fsdp")]):
      models.create("resnet8", seed=0)
    out["unruled"] = "created"
  except ValueError as e:
    out["unruled"] = str(e)
  print(json.dumps(out))
""")


def test_created_sharded_under_a_mesh():
  out = json.loads(run_child([sys.executable, "-c", _SHARDED], devices=8, timeout=600).stdout.strip().splitlines()[-1])
  assert out["conv"] == [[3, 3, 16, 32], [3, 3, 16, 4]]  # "channels" over 8 devices, "conv_in" whole
  assert out["bn"] == [[4], [4], str(jax.P())]  # running stats are not parameters: replicated
  assert out["fc"] == [[8, 10], [10]]
  assert out["mlp"] == [[784, 4], [32, 2], [2], [2, 10]]
  assert out["gpt"] == [[2, 4, 32], [2, 4]]
  assert "conv_in" in out["unruled"]
