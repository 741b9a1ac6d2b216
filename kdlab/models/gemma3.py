"""Gemma 3 (text): ``create("gemma3", ...)``, a :class:`~kdlab.models.decoders.Decoder` with Gemma's choices.

Takes the Hugging Face ``Gemma3TextConfig`` field names (``kdlab.models.pretrained.hf_kwargs`` reads
them from a checkpoint), plus kdlab's ``dtype``, ``param_dtype``, ``remat`` and ``max_len``. What
sets Gemma 3 apart from Llama:

* embeddings times ``sqrt(hidden_size)`` (the factor cast to the compute dtype first);
* RMSNorm scales ``(1 + w)`` computed in float32, ``w`` starting at 0; norms before *and after*
  the attention and the MLP (``input_layernorm``, ``post_attention_layernorm``,
  ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``); per-head q/k RMSNorm before RoPE;
* GeGLU MLP with the tanh GELU (``hidden_activation="gelu_pytorch_tanh"``);
* scores scaled by ``query_pre_attn_scalar ** -0.5``; ``attn_logit_softcapping`` is accepted (it is
  in the configs) but, as in transformers' Gemma 3 (which replaced it by the q/k norms), not applied;
* ``layer_types``: ``sliding_attention`` layers see the last ``sliding_window`` positions
  (a key ``k`` is visible to query ``q`` iff ``q - window < k <= q``) and rotate with
  ``rope_local_base_freq``, unscaled; ``full_attention`` layers see everything before them and
  rotate with ``rope_theta`` and ``rope_scaling`` (``linear``, factor 8, in the 4B+ checkpoints).
  Without ``layer_types`` every sixth layer is global, as transformers assumes;
* logits soft-capped by ``final_logit_softcapping`` (``tanh(x / c) * c``) when set, exposed as
  ``model.logit_softcap`` (then ``logits != final @ unembedding``).
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx

from kdlab.errors import UserError
from kdlab.models.decoders import Arch, Decoder, dtype_name
from kdlab.models.llama import default_max_len, layer_windows, plain_scaling, positive_ints
from kdlab.models.registry import register
from kdlab.models.rope import inv_frequencies

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
GLOBAL_EVERY = 6  # transformers' sliding_window_pattern default: layer i is global iff (i + 1) % 6 == 0


def default_layer_types(num_layers: int, every: int = GLOBAL_EVERY) -> list[str]:
  """Gemma 3's pattern: ``every - 1`` sliding-window layers, then a global one, repeated."""
  return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]


@register("gemma3")
def gemma3(*, rngs: nnx.Rngs, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
           num_attention_heads: int, num_key_value_heads: int, head_dim: int = 256,
           hidden_activation: str = "gelu_pytorch_tanh", rms_norm_eps: float = 1e-6, rope_theta: float = 1e6,
           rope_scaling: dict[str, Any] | None = None, rope_local_base_freq: float = 1e4,
           max_position_embeddings: int = 131072, tie_word_embeddings: bool = True, attention_bias: bool = False,
           query_pre_attn_scalar: float = 256, sliding_window: int | None = 4096,
           layer_types: Sequence[str] | None = None, final_logit_softcapping: float | None = None,
           attn_logit_softcapping: float | None = None, initializer_range: float = 0.02, dtype: Any = "float32",
           param_dtype: Any = "float32", remat: str = "none", max_len: int | None = None) -> Decoder:
  """``create("gemma3", vocab_size=..., hidden_size=..., intermediate_size=..., num_hidden_layers=...,
  num_attention_heads=..., num_key_value_heads=...)``."""
  s = dict(locals())
  del s["rngs"]
  positive_ints(s, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"))
  if hidden_activation not in ACTIVATIONS:
    raise UserError(f"hidden_activation={hidden_activation!r}: gemma3 supports {', '.join(ACTIVATIONS)}")
  s["rope_scaling"] = plain_scaling(rope_scaling)
  s["layer_types"] = list(default_layer_types(num_hidden_layers) if layer_types is None else layer_types)
  windows = layer_windows(s["layer_types"], sliding_window, num_hidden_layers)
  full = inv_frequencies(head_dim, rope_theta, s["rope_scaling"], max_position_embeddings=max_position_embeddings)
  local = inv_frequencies(head_dim, rope_local_base_freq, None, field="rope_local_base_freq")
  arch = Arch(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_layers=num_hidden_layers, num_heads=num_attention_heads, num_kv_heads=num_key_value_heads,
      head_dim=head_dim, eps=float(rms_norm_eps), windows=windows,
      inv_freqs=tuple(local if t == "sliding_attention" else full for t in s["layer_types"]),
      max_len=default_max_len(max_position_embeddings, max_len), activation=ACTIVATIONS[hidden_activation],
      norm_offset=True, qkv_bias=bool(attention_bias), out_bias=bool(attention_bias), qk_norm=True,
      sandwich_norms=True, embed_scale=True, query_scale=float(query_pre_attn_scalar),
      final_softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
      tie_embeddings=bool(tie_word_embeddings), dtype=dtype_name(dtype, "dtype"),
      param_dtype=dtype_name(param_dtype, "param_dtype"), remat=remat, init_std=float(initializer_range))
  return Decoder(arch, spec={"name": "gemma3", **s, "dtype": arch.dtype, "param_dtype": arch.param_dtype},
                 rngs=rngs)
