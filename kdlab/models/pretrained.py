"""Hugging Face model directories <-> kdlab's pretrained decoders (``llama``, ``qwen2``, ``qwen3``, ``gemma3``).

A directory holds ``config.json`` and the weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, named as transformers saves them (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight`` ``[out, in]``, ``lm_head.weight`` unless tied, ...)::

  model = from_pretrained("Qwen3-0.6B", dtype="bfloat16")           # params and compute in bf16
  with jax.set_mesh(mesh):                                          # straight into the sharded layout
    model = from_pretrained(path, mesh=mesh, rules=[("embed", "fsdp"), ("mlp", "model"), ...])
  save_pretrained(model, "export/", tokenizer_from="Qwen3-0.6B")    # transformers loads it back

``model_type`` picks the family: ``llama`` and ``mistral`` (without a sliding window) -> ``llama``,
``qwen2``, ``qwen3``, ``gemma3_text`` and the multimodal ``gemma3`` (its ``text_config`` and
language-model weights) -> ``gemma3``. :func:`hf_kwargs` turns a ``config.json`` into ``create``
keyword arguments, accepting both RoPE spellings (``rope_theta`` + ``rope_scaling``, or
``rope_parameters``, per layer type for Gemma 3); :func:`hf_config_of` is its inverse and writes
both spellings, so transformers 4.x and 5.x read the same RoPE.

Stored tensors may be float32, bfloat16 or float16; they are converted to the model's
``param_dtype``. With a ``mesh``, each device reads only its slice of each tensor
(``jax.make_array_from_callback`` over memory-mapped safetensors). Bad directories (no config,
unsupported ``model_type`` or settings, missing tensor, wrong shape) raise a ``UserError`` naming
the file and the tensor. Exports run in one process (every parameter is gathered to the host).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy reader can return it)
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from kdlab.errors import UserError
from kdlab.mesh import param_shardings
from kdlab.models import gemma3 as gemma3_family
from kdlab.models import llama as llama_family  # noqa: F401  (registers llama, qwen2, qwen3)
from kdlab.models import registry
from kdlab.models.decoders import Decoder, dtype_name
from kdlab.models.rope import SUPPORTED as ROPE_TYPES
from kdlab.models.rope import rope_type

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

FAMILY_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "gemma3": "gemma3"}
EXPORT = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
          "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}

_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COMMON = _SHAPE + ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                    "tie_word_embeddings", "initializer_range")
FIELDS = {  # the config.json fields each family's create() takes as they are (RoPE and windows apart)
    "llama": _COMMON + ("hidden_act", "attention_bias", "mlp_bias"),
    "qwen2": _COMMON + ("hidden_act",),
    "qwen3": _COMMON + ("hidden_act", "attention_bias"),
    "gemma3": _COMMON + ("hidden_activation", "attention_bias", "query_pre_attn_scalar", "final_logit_softcapping",
                         "attn_logit_softcapping"),
}
# What transformers' Gemma3TextConfig assumes for fields the multimodal checkpoints leave out.
GEMMA3_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4}
_DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0}

# kdlab module path inside a layer -> transformers' name; the norms differ between families.
_LAYER = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj", ("attn", "v"): "self_attn.v_proj",
          ("attn", "o"): "self_attn.o_proj", ("attn", "q_norm"): "self_attn.q_norm",
          ("attn", "k_norm"): "self_attn.k_norm", ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
          ("mlp", "down"): "mlp.down_proj", ("attn_norm",): "input_layernorm"}
_LLAMA_NORMS = {("mlp_norm",): "post_attention_layernorm"}
_GEMMA_NORMS = {("attn_out_norm",): "post_attention_layernorm", ("mlp_norm",): "pre_feedforward_layernorm",
                ("mlp_out_norm",): "post_feedforward_layernorm"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


# ----------------------------------------------------------------------------- config.json


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """``path/config.json`` as a dict (UserError when missing or not JSON)."""
  file = pathlib.Path(path) / CONFIG
  if not file.is_file():
    raise UserError(f"{path}: no {CONFIG}; point at a Hugging Face model directory (config.json and "
                    f"model.safetensors or {INDEX})")
  try:
    config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{file}: not valid JSON ({e}); re-download or re-export the model") from None
  if not isinstance(config, dict):
    raise UserError(f"{file}: expected a JSON object")
  return config


def hf_family(hf_config: Mapping[str, Any], field: str) -> str:
  """The registered kdlab model name for ``hf_config``'s ``model_type`` (UserError naming ``field``)."""
  model_type = hf_config.get("model_type")
  if model_type not in FAMILY_OF:
    raise UserError(f"{field}: model_type {model_type!r} is not supported; kdlab loads "
                    f"{', '.join(sorted(FAMILY_OF))}")
  return FAMILY_OF[model_type]


def _text_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The language model's fields (a multimodal Gemma 3 keeps them in ``text_config``)."""
  if hf_config.get("model_type") != "gemma3":
    return dict(hf_config)
  text = dict(hf_config.get("text_config") or {})
  text.setdefault("tie_word_embeddings", hf_config.get("tie_word_embeddings", True))
  return text


def _scaling(params: Mapping[str, Any], field: str) -> dict[str, Any] | None:
  """A ``rope_parameters``/``rope_scaling`` dict as kdlab's ``rope_scaling`` (no ``rope_theta``; None if default)."""
  kind = rope_type(params)
  if kind not in ROPE_TYPES:
    raise UserError(f"{field}: rope type {kind!r} is not supported; kdlab implements {', '.join(ROPE_TYPES)}")
  if kind == "default":
    return None
  scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "rope_type")}
  return {"rope_type": kind, **scaling}


def _rope_kwargs(cfg: Mapping[str, Any], family: str, field: str) -> dict[str, Any]:
  params = cfg.get("rope_parameters") or {}
  if not isinstance(params, Mapping) or not isinstance(cfg.get("rope_scaling") or {}, Mapping):
    raise UserError(f"{field}: rope_parameters and rope_scaling must be objects (or null)")
  if family != "gemma3":
    # transformers: an old-style rope_scaling takes precedence; rope_theta defaults from the top level.
    rope = dict(cfg.get("rope_scaling") or params)
    theta = rope.get("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA[family]))
    return {"rope_theta": float(theta), "rope_scaling": _scaling(rope, f"{field}: rope_scaling")}
  if params and not set(params) <= {"full_attention", "sliding_attention"}:
    raise UserError(f"{field}: rope_parameters for gemma3 must be given per layer type "
                    f"({{'full_attention': {{...}}, 'sliding_attention': {{...}}}}), got keys {sorted(params)}")
  full = dict(params.get("full_attention") or {})
  full.update(cfg.get("rope_scaling") or {})
  local = dict(params.get("sliding_attention") or {})
  if rope_type(local) != "default":
    raise UserError(f"{field}: rope_parameters.sliding_attention has rope type {rope_type(local)!r}; gemma3's "
                    f"local layers are supported with the default RoPE only")
  return {"rope_theta": float(full.get("rope_theta", cfg.get("rope_theta", 1e6))),
          "rope_scaling": _scaling(full, f"{field}: rope_parameters.full_attention"),
          "rope_local_base_freq": float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4)))}


def _window_kwargs(cfg: Mapping[str, Any], family: str, field: str) -> dict[str, Any]:
  n = cfg.get("num_hidden_layers")
  if family == "llama":
    if cfg.get("sliding_window") is not None:
      raise UserError(f"{field}: sliding_window={cfg['sliding_window']}: sliding-window attention is not supported "
                      f"for {cfg.get('model_type')}; use a checkpoint with sliding_window null")
    return {}
  if family in ("qwen2", "qwen3"):
    if not cfg.get("use_sliding_window", False) or cfg.get("sliding_window", 4096) is None:
      return {"sliding_window": None, "layer_types": None}
    window = cfg.get("sliding_window", 4096)
    types = cfg.get("layer_types")
    if types is None and isinstance(n, int):
      first = cfg.get("max_window_layers", 28)
      types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return {"sliding_window": window, "layer_types": types}
  if cfg.get("use_bidirectional_attention"):
    raise UserError(f"{field}: use_bidirectional_attention=true is not supported; kdlab's gemma3 is causal")
  types = cfg.get("layer_types")
  if types is None and isinstance(n, int):
    types = gemma3_family.default_layer_types(n, int(cfg.get("sliding_window_pattern", gemma3_family.GLOBAL_EVERY)))
  return {"sliding_window": cfg.get("sliding_window", 4096), "layer_types": types}


def hf_kwargs(hf_config: Mapping[str, Any], field: str) -> dict[str, Any]:
  """``create(hf_family(hf_config, field), **hf_kwargs(hf_config, field))`` keyword arguments.

  Takes the fields the family reads (missing optional ones keep transformers' defaults), RoPE in
  either spelling and the sliding-window settings; refuses settings kdlab does not implement
  (another ``hidden_act``, an unsupported RoPE type, quantized weights, ...) with a UserError naming
  ``field`` (e.g. the config file) and the setting.
  """
  family = hf_family(hf_config, field)
  cfg = _text_config(hf_config)
  if cfg.get("quantization_config") is not None:
    raise UserError(f"{field}: quantization_config is set; kdlab loads unquantized float checkpoints only")
  if family == "gemma3":
    cfg = {**GEMMA3_DEFAULTS, **cfg}
  missing = [name for name in _SHAPE if name not in cfg]
  if missing:
    raise UserError(f"{field}: {', '.join(missing)} missing; the config does not describe a {family} model")
  kwargs = {name: cfg[name] for name in FIELDS[family] if name in cfg}
  if family == "gemma3":
    activation = kwargs.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in gemma3_family.ACTIVATIONS:
      raise UserError(f"{field}: hidden_activation={activation!r} is not supported; gemma3 supports "
                      f"{', '.join(gemma3_family.ACTIVATIONS)}")
  elif kwargs.get("hidden_act", "silu") != "silu":
    raise UserError(f"{field}: hidden_act={kwargs['hidden_act']!r} is not supported; {family} supports 'silu'")
  if kwargs.get("mlp_bias"):
    raise UserError(f"{field}: mlp_bias=true is not supported (kdlab's llama MLP has no biases)")
  return {**kwargs, **_rope_kwargs(cfg, family, field), **_window_kwargs(cfg, family, field)}


def hf_config_of(model: Decoder) -> dict[str, Any]:
  """The ``config.json`` transformers needs to rebuild ``model`` (a ``llama``/``qwen2``/``qwen3``/``gemma3``)."""
  spec = _spec(model)
  family = spec.pop("name")
  architecture, model_type = EXPORT[family]
  arch = model.arch
  config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
  config.update({name: spec[name] for name in FIELDS[family] if name in spec})
  config.update(num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.eps,
                tie_word_embeddings=arch.tie_embeddings, torch_dtype=arch.param_dtype, dtype=arch.param_dtype)
  if family == "qwen2" and arch.head_dim * arch.num_heads == arch.hidden_size:
    del config["head_dim"]  # not a Qwen2Config field; transformers derives it
  scaling = spec["rope_scaling"]
  params = {k: v for k, v in (scaling or {}).items() if k not in ("rope_type", "type")}
  full = {"rope_type": rope_type(scaling), **params, "rope_theta": spec["rope_theta"]}
  config.update(rope_theta=spec["rope_theta"], rope_scaling=scaling)
  if family == "gemma3":
    config.update(rope_local_base_freq=spec["rope_local_base_freq"], sliding_window=spec["sliding_window"],
                  layer_types=spec["layer_types"],
                  rope_parameters={"full_attention": full, "sliding_attention": {
                      "rope_type": "default", "rope_theta": spec["rope_local_base_freq"]}})
    return config
  config.update(rope_parameters=full, hidden_act="silu")
  if family in ("qwen2", "qwen3"):
    types = spec["layer_types"] or ["full_attention"] * arch.num_layers
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    use = spec["sliding_window"] is not None and bool(sliding)
    config.update(use_sliding_window=use, sliding_window=spec["sliding_window"] if use else None,
                  max_window_layers=sliding[0] if use else arch.num_layers,
                  layer_types=types if use else ["full_attention"] * arch.num_layers)
  return config


def _spec(model: Any) -> dict[str, Any]:
  spec = model.spec() if isinstance(model, Decoder) else {}
  if spec.get("name") not in EXPORT:
    raise UserError(f"model: {type(model).__name__} is not a pretrained-family decoder; Hugging Face export "
                    f"covers {', '.join(EXPORT)}")
  return spec


# ----------------------------------------------------------------------------- tensor names


def _hf_names(model: Decoder, prefix: str = "model.") -> Iterator[tuple[tuple[Any, ...], str, bool]]:
  """``(kdlab param path, transformers tensor name, stored transposed)`` for every parameter of ``model``."""
  norms = _GEMMA_NORMS if model.arch.sandwich_norms else _LLAMA_NORMS
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", k) for k in path)
    leaf = keys[-1]
    if keys[0] == "embed":
      yield keys, f"{prefix}embed_tokens.weight", False
    elif keys[0] == "final_norm":
      yield keys, f"{prefix}norm.weight", False
    elif keys[0] == "unembed":
      yield keys, "lm_head.weight", True
    else:
      module = {**_LAYER, **norms}[keys[2:-1]]
      yield keys, f"{prefix}layers.{keys[1]}.{module}.{_LEAF[leaf]}", leaf == "kernel"


# ----------------------------------------------------------------------------- loading


class _Weights:
  """The tensors of a directory by name: which file holds each, its shape, sliced reads."""

  def __init__(self, path: pathlib.Path):
    from safetensors import safe_open
    self.path = path
    if (path / INDEX).is_file():
      self.where = str(path / INDEX)
      try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{self.where}: not a safetensors index (a JSON object with a weight_map)") from None
      files = sorted(set(weight_map.values()))
    elif (path / SINGLE).is_file():
      self.where, weight_map, files = str(path / SINGLE), None, [SINGLE]
    else:
      raise UserError(f"{path}: no {SINGLE} or {INDEX}; kdlab reads safetensors weights (convert *.bin "
                      f"checkpoints with transformers' save_pretrained)")
    self.handles, self.file_of = {}, {}
    for name in files:
      if not (path / name).is_file():
        raise UserError(f"{self.where}: lists {name}, which is missing from {path}")
      try:
        handle = safe_open(str(path / name), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path / name}: not a readable safetensors file ({e})") from None
      self.handles[name] = handle
      for key in handle.keys():
        if weight_map is None or weight_map.get(key) == name:
          self.file_of[key] = name

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.handles[self.file_of[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...], transposed: bool, dtype: np.dtype) -> np.ndarray:
    """The ``index`` slice of the kdlab-layout tensor (the stored one transposed when ``transposed``)."""
    stored = self.handles[self.file_of[name]].get_slice(name)
    if transposed:
      return np.ascontiguousarray(stored[index[1], index[0]].T).astype(dtype)
    return np.asarray(stored[index] if index else stored[:]).astype(dtype)


def _prefix(weights: _Weights, model_type: str | None) -> str:
  if model_type == "gemma3":  # transformers 5 (first) and 4 layouts of the multimodal checkpoints
    for prefix in ("model.language_model.", "language_model.model."):
      if f"{prefix}embed_tokens.weight" in weights.file_of:
        return prefix
  return "model."


def from_pretrained(path: str | os.PathLike, *, dtype: Any = None, mesh: Mesh | None = None,
                    rules: Sequence[Sequence[Any]] | None = None, **overrides: Any) -> Decoder:
  """The kdlab model of the Hugging Face directory ``path``, weights loaded.

  ``dtype`` (e.g. ``"bfloat16"``) sets both the parameter and the compute dtype (default float32);
  ``overrides`` are further ``create`` keyword arguments (``max_len``, ``remat``, ``param_dtype``,
  ...). With ``mesh`` and ``rules`` (``config.sharding_rules``), every parameter is created with
  its ``NamedSharding`` (``kdlab.mesh.param_shardings``) and each device reads only its slice.
  """
  path = pathlib.Path(path)
  config = read_hf_config(path)
  field = str(path / CONFIG)
  name, kwargs = hf_family(config, field), hf_kwargs(config, field)
  if dtype is not None:
    kwargs["dtype"] = kwargs["param_dtype"] = dtype_name(dtype, "dtype")
  kwargs.update(overrides)
  try:
    # Built off any ambient mesh: the shardings come from ``rules`` below, not from eager sharding.
    with jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
      abstract = nnx.eval_shape(lambda: registry.create(name, **kwargs))
  except (UserError, TypeError) as e:
    raise UserError(f"{field}: {e}") from None
  graphdef, state = nnx.split(abstract)
  shardings = None
  if mesh is not None:
    shardings = param_shardings(abstract, mesh, rules or [], field)
  values = load_params(path, abstract, shardings, model_type=config.get("model_type"))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def load_params(path: str | os.PathLike, model: Decoder, shardings: Any = None, *,
                model_type: str | None = None) -> dict[Any, Any]:
  """The weights of the Hugging Face directory ``path`` as ``model``'s ``nnx.Param`` pure dict, in
  ``model``'s parameter dtypes (``model`` may be abstract, from ``nnx.eval_shape``).

  With ``shardings`` (``kdlab.mesh.param_shardings`` of ``model``) each array is created in its
  sharding and each device reads only its slice of the safetensors files. A missing tensor or a
  shape that differs from ``model``'s is a ``UserError`` naming the file and tensor.
  """
  path = pathlib.Path(path)
  if model_type is None:
    model_type = read_hf_config(path).get("model_type")
  weights = _Weights(path)
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  names = list(_hf_names(model, _prefix(weights, model_type)))
  _check_tensors(weights, names, shapes)

  def load(keys: tuple[Any, ...], tensor: str, transposed: bool) -> jax.Array:
    like = _at(shapes, keys)
    read = lambda index: weights.read(tensor, index, transposed, np.dtype(like.dtype))  # noqa: E731
    if shardings is None:
      return jnp.asarray(read(tuple(slice(None) for _ in like.shape)))
    return _sharded_array(like.shape, _at(shardings, keys), read)

  values: dict[Any, Any] = {}
  for keys, tensor, transposed in names:
    _put(values, keys, load(keys, tensor, transposed))
  return values


def _sharded_array(shape: tuple[int, ...], sharding: Any, read: Any) -> jax.Array:
  """A global array of ``shape`` placed by ``sharding``; each device's shard is ``read(index)`` (its slice)."""
  return jax.make_array_from_callback(shape, sharding, read)


def _check_tensors(weights: _Weights, names: list[tuple[tuple[Any, ...], str, bool]], shapes: Any) -> None:
  missing = [tensor for _, tensor, _ in names if tensor not in weights.file_of]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"{weights.where}: tensor {missing[0]} missing{more}; the weights do not match "
                    f"config.json (re-export the checkpoint with transformers' save_pretrained)")
  for keys, tensor, transposed in names:
    expected = tuple(_at(shapes, keys).shape)
    expected = expected[::-1] if transposed else expected
    if weights.shape(tensor) != expected:
      raise UserError(f"{weights.path / weights.file_of[tensor]}: tensor {tensor} has shape "
                      f"{list(weights.shape(tensor))}, config.json implies {list(expected)}; the weights do not "
                      f"match config.json")


def _at(tree: Any, keys: tuple[Any, ...]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


def _put(tree: dict[Any, Any], keys: tuple[Any, ...], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


# ----------------------------------------------------------------------------- export


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    tokenizer_from: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face directory ``out_dir`` that transformers loads; returns its path.

  ``config.json`` (:func:`hf_config_of`), the weights in the model's ``param_dtype`` as
  ``model.safetensors`` or, past ``max_shard_bytes``, ``model-0000i-of-0000N.safetensors`` with
  ``model.safetensors.index.json``, and the tokenizer files of ``tokenizer_from`` (a Hugging Face
  directory; its ``config.json`` token ids are kept too). Everything is written to a temporary
  folder beside ``out_dir`` and renamed at the end, so ``out_dir`` never holds half an export;
  an existing non-empty ``out_dir`` is refused.
  """
  from safetensors.numpy import save_file
  out = pathlib.Path(out_dir)
  config = hf_config_of(model)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"{out}: exists and is not an empty folder; choose a new output folder")
  if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
    raise UserError(f"max_shard_bytes={max_shard_bytes!r}: must be an int >= 1")
  source = None if tokenizer_from is None else pathlib.Path(tokenizer_from)
  if source is not None and not source.is_dir():
    raise UserError(f"tokenizer_from={str(tokenizer_from)!r}: not a folder; give the Hugging Face directory "
                    f"whose tokenizer files to copy")
  if source is not None and (source / CONFIG).is_file():
    config.update({k: v for k, v in read_hf_config(source).items() if k in TOKEN_IDS})

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = [(tensor, _at(params, keys), transposed) for keys, tensor, transposed in _hf_names(model)]
  shards: list[list[tuple[str, Any, bool]]] = [[]]
  size = 0
  for entry in tensors:
    nbytes = entry[1].size * entry[1].dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
      arrays = {}
      for tensor, value, transposed in shard:
        host = np.asarray(jax.device_get(value))
        arrays[tensor] = np.ascontiguousarray(host.T if transposed else host)
        weight_map[tensor] = file
      save_file(arrays, str(tmp / file), metadata={"format": "pt"})
    if len(shards) > 1:
      total = sum(v.size * v.dtype.itemsize for _, v, _ in tensors)
      (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map},
                                          indent=2))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
      if source is not None and (source / name).is_file():
        shutil.copyfile(source / name, tmp / name)
    if out.exists():
      out.rmdir()
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
