"""Pretrained LM families (llama, qwen2, qwen3, gemma3) against transformers' golden logits, and the
Hugging Face directory loader and exporter (kdlab/models/pretrained.py).

The fixtures under tests/fixtures/hf/<family>/ are tiny random transformers models with every
weight perturbed, saved by transformers, with the logits transformers computes for fixed tokens
(tools/make_hf_fixtures.py writes them; no torch is needed here).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import ROOT, run_child
from kdlab.errors import UserError
from kdlab.models import from_pretrained, registry, save_pretrained
from kdlab.models.pretrained import hf_config_of, hf_family, hf_kwargs, read_hf_config

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
  return {family: from_pretrained(FIXTURES / family) for family in FAMILIES}


def reference(family: str) -> tuple[np.ndarray, np.ndarray]:
  ref = np.load(FIXTURES / family / "reference.npz")
  return ref["tokens"], ref["logits"]


def params_of(model) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def copy_fixture(family: str, dest: pathlib.Path) -> pathlib.Path:
  shutil.copytree(FIXTURES / family, dest)
  return dest


def rewrite_config(directory: pathlib.Path, change) -> None:
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps(change(config)))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(models, family):
  model = models[family]
  tokens, expected = reference(family)
  logits, feats = model(jnp.asarray(tokens), train=False)
  assert logits.dtype == jnp.float32 and logits.shape == expected.shape
  assert float(jnp.abs(logits - expected).max()) < TOL
  assert set(feats) == {f"block{i}" for i in range(model.num_layers)} | {"final"}
  assert model.spec()["name"] == family and model.vocab_size == expected.shape[-1]
  fused = feats["final"] @ model.unembedding()
  if family == "gemma3":
    assert model.logit_softcap == 2.0
    np.testing.assert_allclose(jnp.tanh(fused / 2.0) * 2.0, logits, atol=1e-5)
  else:
    assert model.logit_softcap is None
    np.testing.assert_allclose(fused, logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_read_back_kdlab_exports(family):
  """tools/make_hf_fixtures.py had transformers load kdlab's export of each fixture."""
  check = json.loads((FIXTURES / family / "reference.json").read_text())["export_check"]
  assert check["max_abs_diff"] < TOL and check["missing_keys"] == check["unexpected_keys"] == []
  assert "config.json" in check["files"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_recomputation(models, family):
  model = models[family]
  tokens, _ = reference(family)
  full, _ = model(jnp.asarray(tokens), train=False)
  step = nnx.jit(lambda m, t, c, p: m.decode(t, c, p))
  cache = model.init_cache(tokens.shape[0], 32)
  assert cache.keys[0].shape == (2, 32, model.num_kv_heads, model.head_dim)
  logits, cache = step(model, jnp.asarray(tokens[:, :9]), cache, jnp.arange(9))
  outs = [logits]
  for i in range(9, tokens.shape[1]):  # past the sliding windows (5 and 6 tokens) of gemma3 and qwen2
    logits, cache = step(model, jnp.asarray(tokens[:, i:i + 1]), cache, jnp.full((2, 1), i))
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=TOL)


def test_attention_taps_follow_the_sliding_window(models):
  model = models["gemma3"]  # layer_types: sliding (window 5), full, sliding
  tokens, _ = reference("gemma3")
  logits, feats = model(jnp.asarray(tokens), train=False, taps=("attn0", "attn1"))
  np.testing.assert_allclose(logits, model(jnp.asarray(tokens), train=False)[0], atol=1e-5)
  assert "attn2" not in feats and feats["attn0"].shape == (2, 4, 24, 24)
  q, k = np.indices((24, 24))
  for name, seen in (("attn0", (k <= q) & (k > q - 5)), ("attn1", k <= q)):
    probs = np.asarray(feats[name])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[..., ~seen] == 0) and np.all(probs[..., seen] > 0)


def test_kdlab_export_round_trips(models, tmp_path):
  for family in ("llama", "gemma3"):  # untied vs tied, Llama vs Gemma norm names
    out = save_pretrained(models[family], tmp_path / family)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
      assert f.metadata() == {"format": "pt"} and ("lm_head.weight" in f.keys()) == (family == "llama")
    again = from_pretrained(out)
    expected = params_of(models[family])
    assert params_of(again).keys() == expected.keys()
    for name, value in params_of(again).items():
      np.testing.assert_array_equal(value, expected[name], err_msg=name)
    tokens, _ = reference(family)
    np.testing.assert_array_equal(again(jnp.asarray(tokens), train=False)[0],
                                  models[family](jnp.asarray(tokens), train=False)[0])


def test_bfloat16_sharded_export_and_tokenizer_files(tmp_path):
  model = from_pretrained(FIXTURES / "qwen2", dtype="bfloat16")  # stored bf16 in two shards
  assert model.embed.embedding[...].dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16
  tokenizer = tmp_path / "tok"
  tokenizer.mkdir()
  (tokenizer / "tokenizer.json").write_text('{"model": {}}')
  (tokenizer / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 5, "vocab_size": 1}))
  out = save_pretrained(model, tmp_path / "out", max_shard_bytes=8000, tokenizer_from=tokenizer)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["config.json", "model.safetensors.index.json",
                                                                   "tokenizer.json"])
  config = read_hf_config(out)
  assert (config["torch_dtype"], config["eos_token_id"], config["vocab_size"]) == ("bfloat16", 7, 416)
  with safe_open(str(out / shards[0]), framework="numpy") as f:
    assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
  again = from_pretrained(out, dtype="bfloat16")
  for name, value in params_of(again).items():
    np.testing.assert_array_equal(value, params_of(model)[name], err_msg=name)
  tokens, expected = reference("qwen2")  # bf16 compute: close to the float32 reference, not equal
  assert float(jnp.abs(again(jnp.asarray(tokens), train=False)[0] - expected).max()) < 0.2


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_half_written(models, tmp_path, monkeypatch):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(UserError, match="full: exists and is not an empty folder"):
    save_pretrained(models["llama"], tmp_path / "full")
  with pytest.raises(UserError, match="not a pretrained-family decoder"):
    save_pretrained(registry.create("gpt", vocab_size=8, d_model=8, num_layers=1, num_heads=2, max_len=8),
                    tmp_path / "gpt")
  import safetensors.numpy

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(models["llama"], tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def _old_spelling(config: dict) -> dict:
  config = dict(config)
  params = config.pop("rope_parameters")
  if config["model_type"] == "gemma3_text":
    full, local = dict(params["full_attention"]), params["sliding_attention"]
    config.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=local["rope_theta"], rope_scaling=full)
  else:
    params = dict(params)
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = None if params["rope_type"] == "default" else params
  return config


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_both_rope_spellings_load(tmp_path, family):
  directory = copy_fixture(family, tmp_path / family)
  original = read_hf_config(directory)
  rewrite_config(directory, _old_spelling)
  old = read_hf_config(directory)
  assert "rope_parameters" not in old and old["rope_scaling"]["rope_type"] in ("llama3", "linear")
  assert hf_kwargs(old, "old") == hf_kwargs(original, "new")
  tokens, expected = reference(family)
  logits, _ = from_pretrained(directory)(jnp.asarray(tokens), train=False)
  assert float(jnp.abs(logits - expected).max()) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_of_inverts_hf_kwargs(models, family):
  exported = hf_config_of(models[family])
  original = read_hf_config(FIXTURES / family)
  assert hf_family(exported, "x") == family
  assert hf_kwargs(exported, "exported") == hf_kwargs(original, "original")
  assert hf_kwargs(_old_spelling(exported), "old") == hf_kwargs(original, "original")


def test_qwen2_window_from_max_window_layers_and_a_multimodal_gemma3(tmp_path):
  qwen = copy_fixture("qwen2", tmp_path / "qwen2")
  rewrite_config(qwen, lambda c: {k: v for k, v in c.items() if k != "layer_types"})  # older configs
  assert from_pretrained(qwen).arch.windows == (None, 6)
  # A Gemma 3 multimodal checkpoint: text settings under text_config, weights under language_model.
  gemma = tmp_path / "gemma3"
  gemma.mkdir()
  text = read_hf_config(FIXTURES / "gemma3")
  (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                 "vision_config": {"hidden_size": 8}}))
  tensors = load_file(str(FIXTURES / "gemma3" / "model.safetensors"))
  tensors = {k.replace("model.", "language_model.model.", 1): v for k, v in tensors.items()}
  tensors["vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(gemma / "model.safetensors"), metadata={"format": "pt"})
  tokens, expected = reference("gemma3")
  assert float(jnp.abs(from_pretrained(gemma)(jnp.asarray(tokens), train=False)[0] - expected).max()) < TOL


def test_remat_checkpoints_each_block_and_keeps_gradients():
  cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8)
  tokens = jnp.arange(8)[None] % 32
  loss = lambda m: jnp.mean(m(tokens, train=True)[0] ** 2)  # noqa: E731
  models = [registry.create("qwen3", seed=1, remat=remat, **cfg) for remat in ("none", "full", "dots")]
  # how jax prints the dots policy: its function (jax 0.12) or a policy object (jax 0.11)
  dots = ("dots_with_no_batch_dims_saveable", "DotsSaveable(only_if_no_batch_dims=True)")
  for model, policy in zip(models, (None, ("None",), dots)):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state)
    remats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert len(remats) == (0 if policy is None else 2)
    assert all(any(p in str(e.params["policy"]) for p in policy) for e in remats)
  # The policies differ only in what is saved (checked above); one of them stands for both here.
  grads = nnx.jit(lambda ms: [nnx.grad(loss)(m) for m in ms])(models[:2])
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-4
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_logical_axis_names(models):
  names = set()
  for model in models.values():
    params = nnx.state(model, nnx.Param)
    names |= {tuple(p.out_sharding) for p in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert names == {("vocab", "embed"), ("embed", "vocab"), ("embed", "heads"), ("embed", "kv_heads"),
                   ("heads", "embed"), ("heads",), ("kv_heads",), ("embed", "mlp"), ("mlp", "embed"), ("embed",),
                   (None,)}


def test_bad_directories_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
    from_pretrained(tmp_path)
  missing = copy_fixture("llama", tmp_path / "missing")
  tensors = load_file(str(missing / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError, match=r"missing/model.safetensors: tensor model.layers.1.mlp.up_proj.weight missing"):
    from_pretrained(missing)
  shape = copy_fixture("qwen3", tmp_path / "shape")
  rewrite_config(shape, lambda c: dict(c, intermediate_size=40))
  with pytest.raises(UserError, match=r"shape/model.safetensors: tensor model.layers.0.mlp.down_proj.weight has "
                                      r"shape \[32, 48\], config.json implies \[32, 40\]"):
    from_pretrained(shape)
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(FIXTURES / "llama" / "config.json", no_weights)
  with pytest.raises(UserError, match="no model.safetensors"):
    from_pretrained(no_weights)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope type 'yarn' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(quantization_config={"bits": 4}), "quantization_config"),
])
def test_unsupported_settings_are_named(change, message):
  with pytest.raises(UserError, match=message):
    hf_kwargs({**read_hf_config(FIXTURES / "llama"), **change}, "cfg")


def test_create_refuses_unsupported_settings():
  base = dict(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(UserError, match="rope_scaling: rope type 'dynamic'"):
    registry.create("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **base)
  with pytest.raises(UserError, match="hidden_activation='relu'"):
    registry.create("gemma3", num_key_value_heads=1, head_dim=8, hidden_activation="relu", **base)
  with pytest.raises(UserError, match="num_key_value_heads=3"):
    registry.create("qwen3", num_key_value_heads=3, **base)
  with pytest.raises(UserError, match="max_len=99"):
    registry.create("qwen2", max_position_embeddings=64, max_len=99, **base)
  assert registry.create("llama", max_position_embeddings=10**6, **base).max_len == 8192  # the default cap


_SHARDED = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  from flax import nnx
  from kdlab import mesh as meshlib
  from kdlab.models import create, from_pretrained, pretrained
  reads = []  # (tensor, shape read) for every read from the files
  read = pretrained._Weights.read
  def recording_read(self, name, index, *args):
    value = read(self, name, index, *args)
    reads.append((name, list(value.shape)))
    return value
  pretrained._Weights.read = recording_read
  rules = [("embed", "fsdp"), ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model")]
  mesh = meshlib.make_mesh([("fsdp", 4), ("model", 2)])
  out = {}
  # Loaded under the mesh alone, or under the mesh and the rules (as training builds models).
  for family, ambient_rules in (("llama", ()), ("gemma3", rules)):
    path = f"tests/fixtures/hf/{family}"
    tokens = np.load(f"{path}/reference.npz")["tokens"]
    ref = np.asarray(from_pretrained(path)(tokens, train=False)[0])
    reads.clear()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(ambient_rules):
      model = from_pretrained(path, mesh=mesh, rules=rules)
      logits = nnx.jit(lambda m, x: m(x, train=False)[0])(model, tokens)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shard = lambda x: list(x.sharding.shard_shape(x.shape))
    layer = params["layers"][0]
    out[family] = {"err": float(np.abs(np.asarray(logits) - ref).max()), "embed": shard(params["embed"]["embedding"]),
                   "q": shard(layer["attn"]["q"]["kernel"]), "k": shard(layer["attn"]["k"]["kernel"]),
                   "o": shard(layer["attn"]["o"]["kernel"]), "down": shard(layer["mlp"]["down"]["kernel"]),
                   "norm": shard(layer["attn_norm"]["scale"]), "q_norm": shard(layer["attn"]["q_norm"]["scale"])
                   if "q_norm" in layer["attn"] else None,
                   "embed_reads": sorted({str(shape) for name, shape in reads if name == "model.embed_tokens.weight"})}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    born = create("qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  out["born"] = list(born.layers[0].mlp.gate.kernel.get_value().sharding.shard_shape((32, 48)))
  print(json.dumps(out))
""")


def test_sharded_load_on_eight_devices():
  proc = run_child([sys.executable, "-c", _SHARDED], devices=8, timeout=300)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for family in ("llama", "gemma3"):
    got = out[family]
    assert got["err"] < 1e-5, family
    vocab = {"llama": 400, "gemma3": 64}[family]
    assert got["embed"] == [vocab // 2, 8]  # vocab over model=2, embed 32 over fsdp=4
    assert got["q"] == [8, 16] and got["o"] == [16, 8]  # 4 heads x 8 split over model
    assert got["k"] == [8, 8]  # 2 key/value heads x 8 split over model
    assert got["down"] == [24, 8] and got["norm"] == [8]
    assert got["embed_reads"] == [f"[{vocab // 2}, 8]"]  # every device read its own slice, never the whole table
  assert out["gemma3"]["q_norm"] == [8]  # per-head norms replicated
  assert out["born"] == [8, 24]
