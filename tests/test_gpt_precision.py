"""gpt's precision and memory options: ``dtype``/``param_dtype`` (bfloat16 compute over float32 master
weights), ``remat`` (same values and gradients), ``scan_layers`` (stacked blocks under ``nnx.scan``:
the same logits, taps, gradients and cached decoding as the unrolled model with the same weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab.models import registry

CFG = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, max_len=16)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 0, CFG["vocab_size"], jnp.int32)


def _params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _max_diff(a, b) -> float:
  return max(float(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _loss(tokens):
  def loss(model):
    logits, feats = model(tokens, train=True)
    return jnp.mean(jnp.square(logits)) + jnp.mean(jnp.square(feats["block1"].astype(jnp.float32)))
  return loss


def _top_level_equations(model, tokens) -> list:
  """The equations of the training-mode forward pass's jaxpr (nested jaxprs not expanded)."""
  graphdef, state = nnx.split(model)
  return jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, train=True)[0])(state).eqns


def _stacked_blocks(params: dict) -> dict:
  """An unrolled model's per-block params stacked on a leading axis (a scanned model's layout)."""
  blocks = params["blocks"]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(len(blocks))])


def test_bfloat16_compute_over_float32_weights(tokens):
  ref = registry.create("gpt", seed=0, **CFG)
  model = registry.create("gpt", seed=0, dtype="bfloat16", **CFG)
  assert {x.dtype for x in jax.tree.leaves(_params(model))} == {jnp.dtype(jnp.float32)}
  assert _max_diff(_params(model), _params(ref)) == 0.0  # same master weights
  logits, feats = model(tokens, train=False, taps=("attn0", "values2"))
  assert logits.dtype == jnp.float32
  assert {k: v.dtype for k, v in feats.items()} == {
      "block0": jnp.bfloat16, "block1": jnp.bfloat16, "block2": jnp.bfloat16, "final": jnp.bfloat16,
      "values2": jnp.bfloat16, "attn0": jnp.float32}
  np.testing.assert_allclose(feats["attn0"].sum(-1), 1.0, rtol=1e-6)  # a float32 softmax
  assert model.unembedding().dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.matmul(feats["final"], model.unembedding(), preferred_element_type=jnp.float32),
                             logits, rtol=1e-6, atol=1e-6)
  ref_logits = ref(tokens, train=False)[0]
  err = float(jnp.abs(logits - ref_logits).max())
  assert 0 < err < 0.02 * float(jnp.abs(ref_logits).max())  # bfloat16 rounding, nothing worse
  cache = model.init_cache(2, 12)
  assert cache.keys[0].dtype == jnp.bfloat16 and model.init_cache(2, 12, "float32").values[2].dtype == jnp.float32
  decoded, _ = model.decode(tokens, cache, jnp.arange(12))
  np.testing.assert_allclose(decoded, logits, atol=0.02 * float(jnp.abs(logits).max()))
  grads = nnx.grad(_loss(tokens))(model)
  assert {x.dtype for x in jax.tree.leaves(nnx.to_pure_dict(grads))} == {jnp.dtype(jnp.float32)}


def test_dtype_names_and_param_dtype(tokens):
  by_name = registry.create("gpt", seed=0, dtype="bfloat16", param_dtype="bfloat16", **CFG)
  by_dtype = registry.create("gpt", seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **CFG)
  assert {x.dtype for x in jax.tree.leaves(_params(by_name))} == {jnp.dtype(jnp.bfloat16)}
  assert _max_diff(_params(by_name), _params(by_dtype)) == 0.0
  np.testing.assert_array_equal(by_name(tokens, train=False)[0], by_dtype(tokens, train=False)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int8"), "dtype: expected a floating dtype"),
    (dict(dtype="bf16x"), "dtype: expected a floating dtype"),
    (dict(param_dtype=None), "param_dtype: expected a floating dtype"),
    (dict(remat="some"), "remat: expected one of 'none', 'full', 'dots'"),
    (dict(scan_layers="yes"), "scan_layers: expected True or False"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    registry.create("gpt", seed=0, **CFG, **kwargs)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(tokens, remat):
  cfg = dict(CFG, dropout=0.1)  # the recomputed blocks must draw the same dropout masks
  ref = registry.create("gpt", seed=0, **cfg)
  model = registry.create("gpt", seed=0, remat=remat, **cfg)
  ref_loss, ref_grads = nnx.value_and_grad(_loss(tokens))(ref)
  loss, grads = nnx.value_and_grad(_loss(tokens))(model)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert _max_diff(grads, ref_grads) < 1e-7
  np.testing.assert_allclose(model(tokens, train=False)[0], ref(tokens, train=False)[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("remat, policy", [("full", None),
                                           ("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)])
def test_remat_checkpoints_each_block(tokens, remat, policy):
  equations = _top_level_equations(registry.create("gpt", seed=0, remat=remat, **CFG), tokens)
  checkpoints = [e for e in equations if e.primitive.name == "remat2"]  # jax.checkpoint
  assert len(checkpoints) == CFG["num_layers"]
  assert all(e.params["policy"] is policy for e in checkpoints)
  plain = _top_level_equations(registry.create("gpt", seed=0, **CFG), tokens)
  assert not [e for e in plain if e.primitive.name == "remat2"]


def test_scan_layers_is_one_scan_over_the_blocks(tokens):
  equations = _top_level_equations(registry.create("gpt", seed=0, scan_layers=True, **CFG), tokens)
  scans = [e for e in equations if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == CFG["num_layers"]
  # The blocks' matmuls are all inside the scan; only the unembedding's is left outside.
  assert [e.primitive.name for e in equations].count("dot_general") == 1


def test_scan_layers_stacks_the_same_weights():
  ref = registry.create("gpt", seed=0, **CFG)
  model = registry.create("gpt", seed=0, scan_layers=True, **CFG)
  params = _params(model)
  assert params["blocks"]["attn"]["query"]["kernel"].shape == (3, 32, 32)
  assert _max_diff(params["blocks"], _stacked_blocks(_params(ref))) == 0.0
  names = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert names["blocks"]["attn"]["query"]["kernel"].get_value() == jax.P("layers", "embed", "heads")
  assert names["blocks"]["norm1"]["scale"].get_value() == jax.P("layers", "embed")
  assert names["embed"]["embedding"].get_value() == jax.P("vocab", "embed")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layers_equals_the_unrolled_model(tokens, remat):
  cfg = dict(CFG, dropout=0.1, tie_embeddings=False)
  ref = registry.create("gpt", seed=0, remat=remat, **cfg)
  model = registry.create("gpt", seed=5, remat=remat, scan_layers=True, **cfg)  # other weights ...
  # ... then the reference's weights and dropout streams, the blocks' stacked.
  variables, state = nnx.to_pure_dict(nnx.state(ref)), nnx.state(model)
  nnx.replace_by_pure_dict(state, {**variables, "blocks": _stacked_blocks(variables)})
  nnx.update(model, state)
  taps = ("values0", "values2")
  ref_logits, ref_feats = ref(tokens, train=False, taps=taps)
  logits, feats = model(tokens, train=False, taps=taps)
  assert set(feats) == set(ref_feats) == {"block0", "block1", "block2", "final", "values0", "values2"}
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  assert _max_diff(feats, {k: ref_feats[k] for k in feats}) < 1e-5
  # Training mode (dropout on): each layer keeps its own dropout stream, so the losses agree too.
  ref_loss, ref_grads = nnx.value_and_grad(_loss(tokens))(ref)
  loss, grads = nnx.jit(nnx.value_and_grad(_loss(tokens)))(model)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  ref_grads = nnx.to_pure_dict(ref_grads)
  grads = nnx.to_pure_dict(grads)
  assert _max_diff(grads["blocks"], _stacked_blocks(ref_grads)) < 1e-6
  assert _max_diff({k: v for k, v in grads.items() if k != "blocks"},
                   {k: v for k, v in ref_grads.items() if k != "blocks"}) < 1e-6


def test_scan_layers_decodes_with_a_cache(tokens):
  model = registry.create("gpt", seed=0, scan_layers=True, **CFG)
  logits, _ = model(tokens, train=False)
  cache = model.init_cache(2, 16)
  outs = []
  out, cache = model.decode(tokens[:, :7], cache, jnp.arange(7))  # prefill
  outs.append(out)
  step = nnx.jit(lambda m, t, c, p: m.decode(t, c, p))
  for i in range(7, 12):
    out, cache = step(model, tokens[:, i:i + 1], cache, jnp.array([i]))
    outs.append(out)
  decoded = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(decoded, logits, rtol=1e-5, atol=1e-5)


def test_scan_layers_refuses_attention_taps(tokens):
  model = registry.create("gpt", seed=0, scan_layers=True, **CFG)
  assert "attn1" in model.tap_names()
  with pytest.raises(ValueError, match="scan_layers=False"):
    model(tokens, train=False, taps=("attn1",))
