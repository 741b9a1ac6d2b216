"""The Llama family: ``llama``, ``qwen2`` and ``qwen3``, one :class:`~kdlab.models.decoders.Decoder`
configured by flags.

Each takes the Hugging Face ``config.json`` field names (``kdlab.models.pretrained.hf_kwargs`` reads
them from a checkpoint), plus kdlab's ``dtype`` (compute), ``param_dtype``, ``remat`` and ``max_len``
(the longest sequence and the default cache length: ``max_position_embeddings`` capped at
:data:`MAX_LEN_CAP`)::

  create("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

The families differ in flags only:

| name | q/k/v bias | output bias | per-head q/k RMSNorm | sliding windows |
|---|---|---|---|---|
| ``llama`` | ``attention_bias`` | ``attention_bias`` | no | no |
| ``qwen2`` | always | no | no | ``layer_types`` + ``sliding_window`` |
| ``qwen3`` | ``attention_bias`` | ``attention_bias`` | yes | ``layer_types`` + ``sliding_window`` |

All use SiLU gated MLPs (``hidden_act="silu"``; anything else is refused), RMSNorm ``w * x`` and
RoPE with ``rope_theta`` and ``rope_scaling`` (``kdlab.models.rope``: default, linear, llama3).
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx

from kdlab.errors import UserError
from kdlab.models.decoders import Arch, Decoder, dtype_name
from kdlab.models.registry import register
from kdlab.models.rope import inv_frequencies

MAX_LEN_CAP = 8192  # default max_len (cache length) when max_position_embeddings is larger
LAYER_TYPES = ("full_attention", "sliding_attention")


def default_max_len(max_position_embeddings: int, max_len: int | None) -> int:
  """``max_len``, or ``max_position_embeddings`` capped at :data:`MAX_LEN_CAP`; at most the former."""
  if max_len is None:
    return min(max_position_embeddings, MAX_LEN_CAP)
  if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= max_position_embeddings:
    raise UserError(f"max_len={max_len!r}: must be an int in [1, max_position_embeddings="
                    f"{max_position_embeddings}]")
  return max_len


def layer_windows(layer_types: Sequence[str] | None, sliding_window: int | None, num_layers: int,
                  ) -> tuple[int | None, ...]:
  """Per-layer windows: ``sliding_window`` where ``layer_types`` says ``sliding_attention``, None elsewhere
  (all None when ``sliding_window`` is None, as transformers then attends fully)."""
  if layer_types is None:
    return (None,) * num_layers
  if isinstance(layer_types, str) or len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
    raise UserError(f"layer_types={layer_types!r}: expected a list of {num_layers} entries (num_hidden_layers), "
                    f"each one of {', '.join(LAYER_TYPES)}")
  return tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)


def positive_ints(spec: dict[str, Any], names: Sequence[str]) -> None:
  """UserError unless each ``spec[name]`` is an int >= 1."""
  for name in names:
    value = spec[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{name}={value!r}: must be an int >= 1")


def plain_scaling(scaling: Any) -> dict[str, Any] | None:
  """A ``rope_scaling`` mapping as a plain dict (None stays None), for the model's JSON spec."""
  if scaling is None:
    return None
  if not hasattr(scaling, "keys"):
    raise UserError(f"rope_scaling={scaling!r}: expected a dict such as {{'rope_type': 'linear', 'factor': 8.0}} "
                    f"or None")
  return {str(k): scaling[k] for k in scaling.keys()}


def _decoder(name: str, *, rngs: nnx.Rngs, spec: dict[str, Any], qkv_bias: bool, out_bias: bool,
             qk_norm: bool, windows: Sequence[str] | None = None, sliding_window: int | None = None) -> Decoder:
  s = dict(spec, rope_scaling=plain_scaling(spec["rope_scaling"]))
  positive_ints(s, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"))
  if s["hidden_act"] != "silu":
    raise UserError(f"hidden_act={s['hidden_act']!r}: {name} supports only 'silu' (SwiGLU)")
  num_kv_heads = s["num_attention_heads"] if s["num_key_value_heads"] is None else s["num_key_value_heads"]
  head_dim = s["head_dim"]
  if head_dim is None:
    if s["hidden_size"] % s["num_attention_heads"]:
      raise UserError(f"head_dim: not given and hidden_size={s['hidden_size']} is not divisible by "
                      f"num_attention_heads={s['num_attention_heads']}; set head_dim")
    head_dim = s["hidden_size"] // s["num_attention_heads"]
  inv = inv_frequencies(head_dim, s["rope_theta"], s["rope_scaling"],
                        max_position_embeddings=s["max_position_embeddings"])
  layers = s["num_hidden_layers"]
  arch = Arch(
      vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
      num_layers=layers, num_heads=s["num_attention_heads"], num_kv_heads=num_kv_heads, head_dim=head_dim,
      eps=float(s["rms_norm_eps"]), windows=layer_windows(windows, sliding_window, layers), inv_freqs=(inv,) * layers,
      max_len=default_max_len(s["max_position_embeddings"], s["max_len"]), activation="silu",
      qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm, tie_embeddings=bool(s["tie_word_embeddings"]),
      dtype=dtype_name(s["dtype"], "dtype"), param_dtype=dtype_name(s["param_dtype"], "param_dtype"),
      remat=s["remat"], init_std=float(s["initializer_range"]))
  spec = {"name": name, **s, "dtype": arch.dtype, "param_dtype": arch.param_dtype}
  return Decoder(arch, spec=spec, rngs=rngs)


@register("llama")
def llama(*, rngs: nnx.Rngs, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
          num_attention_heads: int, num_key_value_heads: int | None = None, head_dim: int | None = None,
          hidden_act: str = "silu", rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
          rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 2048,
          tie_word_embeddings: bool = False, attention_bias: bool = False, mlp_bias: bool = False,
          initializer_range: float = 0.02, dtype: Any = "float32", param_dtype: Any = "float32",
          remat: str = "none", max_len: int | None = None) -> Decoder:
  """``create("llama", vocab_size=..., hidden_size=..., intermediate_size=..., num_hidden_layers=...,
  num_attention_heads=...)`` (Llama 2/3; Mistral without a sliding window)."""
  if mlp_bias:
    raise UserError("mlp_bias=True: biases in the MLP are not supported; kdlab's llama has none")
  spec = dict(locals())
  del spec["rngs"]
  return _decoder("llama", rngs=rngs, spec=spec, qkv_bias=bool(attention_bias), out_bias=bool(attention_bias),
                  qk_norm=False)


@register("qwen2")
def qwen2(*, rngs: nnx.Rngs, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
          num_attention_heads: int, num_key_value_heads: int | None = None, head_dim: int | None = None,
          hidden_act: str = "silu", rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
          rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 32768,
          tie_word_embeddings: bool = False, sliding_window: int | None = None,
          layer_types: Sequence[str] | None = None, initializer_range: float = 0.02, dtype: Any = "float32",
          param_dtype: Any = "float32", remat: str = "none", max_len: int | None = None) -> Decoder:
  """``create("qwen2", ...)``: q/k/v projections with biases; ``sliding_window`` (None = off) applies to
  the ``sliding_attention`` entries of ``layer_types``."""
  spec = dict(locals())
  del spec["rngs"]
  spec["layer_types"] = None if layer_types is None else list(layer_types)
  return _decoder("qwen2", rngs=rngs, spec=spec, qkv_bias=True, out_bias=False, qk_norm=False,
                  windows=layer_types, sliding_window=sliding_window)


@register("qwen3")
def qwen3(*, rngs: nnx.Rngs, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
          num_attention_heads: int, num_key_value_heads: int | None = None, head_dim: int | None = 128,
          hidden_act: str = "silu", rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
          rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 32768,
          tie_word_embeddings: bool = False, attention_bias: bool = False, sliding_window: int | None = None,
          layer_types: Sequence[str] | None = None, initializer_range: float = 0.02, dtype: Any = "float32",
          param_dtype: Any = "float32", remat: str = "none", max_len: int | None = None) -> Decoder:
  """``create("qwen3", ...)``: per-head RMSNorm of queries and keys before RoPE."""
  spec = dict(locals())
  del spec["rngs"]
  spec["layer_types"] = None if layer_types is None else list(layer_types)
  return _decoder("qwen3", rngs=rngs, spec=spec, qkv_bias=bool(attention_bias), out_bias=bool(attention_bias),
                  qk_norm=True, windows=layer_types, sliding_window=sliding_window)
