"""The decoder shared by the pretrained LM families (``llama``, ``qwen2``, ``qwen3``, ``gemma3``).

One :class:`Decoder`, configured by an :class:`Arch` (the family modules build it from Hugging Face
config fields): token embedding (optionally times ``sqrt(hidden)``), pre-norm blocks of grouped-query
attention (GQA: ``num_kv_heads`` key/value heads shared by groups of query heads; optional q/k/v
and output biases, optional per-head RMSNorm of queries and keys before RoPE, per-layer RoPE
frequencies and sliding windows) and a gated MLP
(``down(act(gate(x)) * up(x))``, SiLU or GELU), optional "sandwich" norms on the attention and MLP
outputs (Gemma), a final RMSNorm, and a tied or untied unembedding with optional logit
soft-capping (``tanh(x / c) * c``).

RMSNorm runs in float32: ``w * cast(normed)`` (Llama/Qwen, ``w`` starts at 1) or
``cast(normed * (1 + w))`` (Gemma, ``w`` starts at 0). Parameters are created in
``param_dtype`` and cast to the compute ``dtype`` at use; softmaxes run in float32 and logits are
returned in float32.

The contract is ``gpt``'s (kdlab/models/gpt.py):

* ``model(tokens [B, L], *, train, taps=(), segment_ids=None, positions=None) -> (logits [B, L, V]
  float32, feats)``; ``feats`` always holds ``block{i}`` ``[B, L, D]`` (the residual stream after
  block i) and ``final`` ``[B, L, D]`` (the final-normed hidden state), and ``attn{i}``
  ``[B, H, L, L]`` (attention probabilities) only when named in ``taps``. ``train`` changes nothing
  (pretrained decoders use no dropout).
* Packed rows: ``segment_ids`` int ``[B, L]`` (which example of the row a token belongs to; 0 =
  padding) lets a query see a key only in its own segment (and causally, and in a sliding-window
  layer only keys less than ``window`` positions back); ``positions`` int ``[B, L]`` are the RoPE
  positions (restarting at each example), else ``arange(L)``. Causality is by index in the row;
  ``positions`` alone keep one segment. Every query sees at least itself (padding attends within
  the padding), so no row is all-masked. Without either the graph is the plain causal one.
* ``unembedding()`` ``[D, V]``: ``logits == feats["final"] @ unembedding()`` unless
  ``logit_softcap`` (a float, else None) caps them; fused losses must check it.
* ``init_cache(batch, length=None, dtype=None)`` and ``decode(tokens, cache, positions)`` as
  ``gpt.decode``: keys/values of the ``num_kv_heads`` heads ``[B, S, K, Dh]`` per layer; a
  query at position ``p`` reads cache slots ``s <= p`` (and ``s > p - window`` in a sliding-window
  layer), so slots past it are never read.

Parameters carry logical axis names: ``vocab``, ``embed``, ``heads`` (query heads x head size, also
the output projection's input), ``kv_heads`` (key/value projections' outputs), ``mlp``; norms
``("embed",)``, per-head norms ``(None,)``. Under a mesh (``jax.set_mesh`` and
``nnx.logical_axis_rules``) they are created sharded, as ``gpt``'s are.

``remat``: ``"none"``; ``"full"`` recomputes each block in the backward pass (``nnx.remat``);
``"dots"`` keeps the blocks' matmul outputs without batch dimensions (the projections) and
recomputes the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.errors import UserError
from kdlab.models.gpt import KVCache
from kdlab.models.packing import check_packing, segment_visible
from kdlab.models.rope import apply_rope

DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
REMAT = ("none", "full", "dots")

__all__ = ["Arch", "Decoder", "KVCache", "dtype_name"]


def dtype_name(value: Any, field: str) -> str:
  """``value`` (a dtype or its name) as one of :data:`DTYPES`; else a UserError naming ``field``."""
  try:
    name = jnp.dtype(value).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise UserError(f"{field}={value!r}: expected one of {', '.join(DTYPES)}")
  return name


@dataclasses.dataclass(frozen=True)
class Arch:
  """Everything that shapes a :class:`Decoder` (hashable: it is static graph data).

  Per-layer settings are tuples over layers: ``windows`` (a sliding window, or None for full
  causal attention) and ``inv_freqs`` (the RoPE inverse frequencies, ``head_dim / 2`` each).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  eps: float
  windows: tuple[int | None, ...]
  inv_freqs: tuple[tuple[float, ...], ...]
  max_len: int
  activation: str = "silu"
  norm_offset: bool = False  # Gemma's (1 + w) scale
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  sandwich_norms: bool = False  # Gemma's norms on the attention and MLP outputs
  embed_scale: bool = False  # embeddings times sqrt(hidden_size)
  query_scale: float | None = None  # scores times query_scale ** -0.5; None = head_dim ** -0.5
  final_softcap: float | None = None
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  init_std: float = 0.02

  def check(self) -> None:
    """Raises a UserError (naming the Hugging Face field) for an inconsistent architecture."""
    for name, field in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                        ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
                        ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                        ("head_dim", "head_dim"), ("max_len", "max_len")):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{field}={value!r}: must be an int >= 1")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_key_value_heads={self.num_kv_heads}: must divide num_attention_heads="
                      f"{self.num_heads} (each key/value head serves a group of query heads)")
    if len(self.windows) != self.num_layers or len(self.inv_freqs) != self.num_layers:
      raise ValueError(f"Arch: windows and inv_freqs need one entry per layer ({self.num_layers})")
    for w in self.windows:
      if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise UserError(f"sliding_window={w!r}: must be an int >= 1 (or None for full attention)")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Arch.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
    if self.remat not in REMAT:
      raise UserError(f"remat={self.remat!r}: expected one of {', '.join(REMAT)}")
    for name in ("dtype", "param_dtype"):
      dtype_name(getattr(self, name), name)
    for name, field in (("final_softcap", "final_logit_softcapping"), ("query_scale", "query_pre_attn_scalar")):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise UserError(f"{field}={value!r}: must be a positive number or None")


def _init(std: float, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _zeros(axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.are_all_axes_explicit


def _like(x: jax.Array):
  """``x``'s sharding under an explicit mesh (for products contracting a sharded axis), else None."""
  return jax.typeof(x).sharding if _explicit_mesh() else None


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32; ``offset`` selects Gemma's ``(1 + w)`` scale."""

  def __init__(self, dim: int, *, eps: float, offset: bool, axes: tuple[str | None, ...], param_dtype: str,
               rngs: nnx.Rngs):
    init = nnx.initializers.zeros_init() if offset else nnx.initializers.ones_init()
    self.eps, self.offset = eps, offset
    self.scale = nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), (dim,), jnp.dtype(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...]
    if self.offset:
      return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * normed.astype(x.dtype)


def visible(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array:
  """Which keys each query sees: ``[B or 1, T, S]`` bool from ``q_positions [B or 1, T]`` and
  ``k_positions [B or 1, S]``: ``k <= q``, and ``q - window < k`` in a sliding-window layer."""
  q, k = q_positions[:, :, None], k_positions[:, None, :]
  mask = k <= q
  if window is not None:
    mask = mask & (k > q - window)
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
              want_probs: bool) -> tuple[jax.Array, jax.Array | None]:
  """Grouped-query attention: ``q [B, T, H, Dh]``, ``k``/``v`` ``[B, S, K, Dh]`` (query head ``h`` reads
  key/value head ``h // (H / K)``), ``mask [B or 1, T, S]`` -> (``[B, T, H, Dh]``, probabilities
  ``[B, H, T, S]`` float32 when ``want_probs``, else None). Scores and softmax in float32."""
  if not want_probs:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale), None
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  grouped = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
  y = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return y.reshape(b, t, h, d), probs.reshape(b, h, t, s)


class Attention(nnx.Module):
  """Causal GQA self-attention of one layer (its RoPE frequencies and window fixed at creation)."""

  def __init__(self, arch: Arch, layer: int, *, rngs: nnx.Rngs):
    a = arch
    self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
    self.inv_freq, self.window = a.inv_freqs[layer], a.windows[layer]
    self.scale = a.head_dim ** -0.5 if a.query_scale is None else a.query_scale ** -0.5
    common = dict(dtype=jnp.dtype(a.dtype), param_dtype=jnp.dtype(a.param_dtype), rngs=rngs)

    def proj(n_in: int, n_out: int, axes: tuple[str, str], bias: bool) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=_init(a.init_std, axes),
                        bias_init=_zeros(axes[1:]), **common)

    self.q = proj(a.hidden_size, a.num_heads * a.head_dim, ("embed", "heads"), a.qkv_bias)
    self.k = proj(a.hidden_size, a.num_kv_heads * a.head_dim, ("embed", "kv_heads"), a.qkv_bias)
    self.v = proj(a.hidden_size, a.num_kv_heads * a.head_dim, ("embed", "kv_heads"), a.qkv_bias)
    self.o = proj(a.num_heads * a.head_dim, a.hidden_size, ("heads", "embed"), a.out_bias)
    self.qk_norm = a.qk_norm
    if a.qk_norm:
      norm = dict(eps=a.eps, offset=a.norm_offset, axes=(None,), param_dtype=a.param_dtype, rngs=rngs)
      self.q_norm = RMSNorm(a.head_dim, **norm)
      self.k_norm = RMSNorm(a.head_dim, **norm)

  def __call__(self, x: jax.Array, positions: jax.Array, *, want_probs: bool = False,
               cache: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None):
    """``x [B, T, D]`` at ``positions [B or 1, T]`` -> (``[B, T, D]``, probabilities or None, cache).

    Without ``cache`` the ``T`` tokens attend to each other (causally, or as ``mask [B, T, T]``
    says: packed rows, :func:`kdlab.models.packing.segment_visible`); with ``cache`` (keys, values ``[B, S, K, Dh]``)
    their keys/values are written at ``positions`` first and the queries read the cache; the
    updated cache is returned (None without one).
    """
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
    if cache is None:
      keys, values, slots = k, v, positions
    else:
      keys, values = cache
      rows = jnp.arange(b)[:, None]
      keys = keys.at[rows, positions].set(k.astype(keys.dtype))
      values = values.at[rows, positions].set(v.astype(values.dtype))
      cache = (keys, values)
      slots = jnp.arange(keys.shape[1])[None]
    if mask is None:
      mask = visible(positions, slots, self.window)
    y, probs = attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale=self.scale,
                         want_probs=want_probs)
    return self.o(y.reshape(b, t, -1), out_sharding=_like(x)), probs, cache


class GatedMLP(nnx.Module):
  """``down(act(gate(x)) * up(x))`` (SwiGLU with SiLU, GeGLU with GELU)."""

  def __init__(self, arch: Arch, *, rngs: nnx.Rngs):
    a = arch
    common = dict(use_bias=False, dtype=jnp.dtype(a.dtype), param_dtype=jnp.dtype(a.param_dtype), rngs=rngs)
    self.gate = nnx.Linear(a.hidden_size, a.intermediate_size, kernel_init=_init(a.init_std, ("embed", "mlp")),
                           **common)
    self.up = nnx.Linear(a.hidden_size, a.intermediate_size, kernel_init=_init(a.init_std, ("embed", "mlp")),
                         **common)
    self.down = nnx.Linear(a.intermediate_size, a.hidden_size, kernel_init=_init(a.init_std, ("mlp", "embed")),
                           **common)
    self.activation = a.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate(x)
    if self.activation == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=self.activation == "gelu_tanh")
    return self.down(gate * self.up(x), out_sharding=_like(x))


class Block(nnx.Module):
  """``x + [out_norm](attn(attn_norm(x)))``, then ``x + [out_norm](mlp(mlp_norm(x)))``."""

  def __init__(self, arch: Arch, layer: int, *, rngs: nnx.Rngs):
    norm = dict(eps=arch.eps, offset=arch.norm_offset, axes=("embed",), param_dtype=arch.param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(arch.hidden_size, **norm)
    self.attn = Attention(arch, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(arch.hidden_size, **norm)
    self.mlp = GatedMLP(arch, rngs=rngs)
    self.sandwich = arch.sandwich_norms
    if arch.sandwich_norms:
      self.attn_out_norm = RMSNorm(arch.hidden_size, **norm)
      self.mlp_out_norm = RMSNorm(arch.hidden_size, **norm)

  def __call__(self, x: jax.Array, positions: jax.Array, *, want_probs: bool = False,
               cache: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None):
    """``x [B, T, D]`` -> (``[B, T, D]``, probabilities or None, cache); see :meth:`Attention.__call__`."""
    y, probs, cache = self.attn(self.attn_norm(x), positions, want_probs=want_probs, cache=cache, mask=mask)
    x = x + (self.attn_out_norm(y) if self.sandwich else y)
    y = self.mlp(self.mlp_norm(x))
    return x + (self.mlp_out_norm(y) if self.sandwich else y), probs, cache


def _block_fn(want_probs: bool):
  """``(block, x, positions, mask) -> (x, probs)``, positional only (as ``nnx.remat`` needs); ``mask``
  None is the plain causal attention."""

  def run(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array | None):
    y, probs, _ = block(x, positions, want_probs=want_probs, mask=mask)
    return y, probs

  return run


_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _rematted(run: Any, remat: str) -> Any:
  """``run`` recomputed in the backward pass as ``remat`` (one of :data:`REMAT`) says."""
  return run if remat == "none" else nnx.remat(run, policy=_POLICIES[remat])


class Decoder(nnx.Module):
  """A pretrained-family decoder LM; see the module docstring for the contract.

  ``spec`` is the ``create`` keyword arguments with the model ``name`` (JSON-able): :meth:`spec`
  returns it (``kdlab.models.pretrained.hf_config_of`` exports from it).
  """

  def __init__(self, arch: Arch, *, spec: dict[str, Any], rngs: nnx.Rngs):
    arch.check()
    self.arch = arch
    self.spec_json = json.dumps(spec, sort_keys=True)
    self.vocab_size, self.num_layers, self.max_len = arch.vocab_size, arch.num_layers, arch.max_len
    self.hidden_size, self.num_heads, self.num_kv_heads = arch.hidden_size, arch.num_heads, arch.num_kv_heads
    self.head_dim, self.dtype = arch.head_dim, jnp.dtype(arch.dtype)
    self.tie_embeddings, self.logit_softcap = arch.tie_embeddings, arch.final_softcap
    # Parameters are created sharded (flax's eager sharding) only under a mesh (jax.set_mesh).
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.embed = nnx.Embed(arch.vocab_size, arch.hidden_size, dtype=self.dtype,
                             param_dtype=jnp.dtype(arch.param_dtype),
                             embedding_init=_init(arch.init_std, ("vocab", "embed")), rngs=rngs)
      self.layers = nnx.List([Block(arch, i, rngs=rngs) for i in range(arch.num_layers)])
      self.final_norm = RMSNorm(arch.hidden_size, eps=arch.eps, offset=arch.norm_offset, axes=("embed",),
                                param_dtype=arch.param_dtype, rngs=rngs)
      if not arch.tie_embeddings:
        self.unembed = nnx.Param(_init(arch.init_std, ("embed", "vocab"))(
            rngs.params(), (arch.hidden_size, arch.vocab_size), jnp.dtype(arch.param_dtype)))

  def spec(self) -> dict[str, Any]:
    """``{"name": family, **create_kwargs}``: ``create(**spec)`` builds this architecture again."""
    return json.loads(self.spec_json)

  def unembedding(self) -> jax.Array:
    """The ``[D, V]`` unembedding matrix (in ``param_dtype``): before soft-capping,
    ``logits = feats["final"] @ model.unembedding()``."""
    if self.tie_embeddings:
      return self.embed.embedding[...].T
    return self.unembed[...]

  def tap_names(self) -> list[str]:
    """Every name ``feats`` can hold."""
    return [f"{kind}{i}" for i in range(self.num_layers) for kind in ("block", "attn")] + ["final"]

  def _embed(self, tokens: jax.Array) -> jax.Array:
    # Explicit sharding cannot infer a gather's output from a vocab-sharded table: the rows
    # follow the tokens' sharding, the features stay whole.
    spec = jax.P(*jax.typeof(tokens).sharding.spec, None) if _explicit_mesh() else None
    x = self.embed(tokens, out_sharding=spec)
    if self.arch.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.hidden_size), x.dtype)
    return x

  def _logits(self, h: jax.Array) -> jax.Array:
    logits = jnp.matmul(h, self.unembedding().astype(h.dtype), preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32)
    if self.logit_softcap is not None:
      logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
    return logits

  def _check_tokens(self, tokens: Any, what: str) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected [batch, {what}] integer ids, got {tokens.dtype} {tokens.shape}")
    return tokens

  def __call__(self, tokens: jax.Array, *, train: bool, taps: Sequence[str] = (),
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``tokens [B, L]`` -> ``(logits [B, L, V] float32, feats)``; packed rows with ``segment_ids``
    and ``positions`` ``[B, L]`` (see the module docstring)."""
    del train  # no dropout in these families
    tokens = self._check_tokens(tokens, "length")
    segment_ids, positions = check_packing(segment_ids, positions, tokens.shape)
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
    unknown = sorted(set(taps) - set(self.tap_names()))
    if unknown:
      raise ValueError(f"taps: unknown {unknown}; this model has block0..{self.num_layers - 1}, attn{{i}}, final")
    x = self._embed(tokens)
    masks = {}  # none: each layer builds its plain causal mask (the unpacked graph, unchanged)
    if segment_ids is not None or positions is not None:
      segment_ids = jnp.zeros_like(tokens, jnp.int32) if segment_ids is None else segment_ids
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
      # One mask per distinct window, built once for all layers.
      masks = {w: segment_visible(segment_ids, positions, w) for w in set(self.arch.windows)}
    else:
      positions = jnp.arange(tokens.shape[1])[None]
    feats: dict[str, jax.Array] = {}
    for i, block in enumerate(self.layers):
      mask = masks.get(self.arch.windows[i])
      x, probs = _rematted(_block_fn(f"attn{i}" in taps), self.arch.remat)(block, x, positions, mask)
      feats[f"block{i}"] = x
      if probs is not None:
        feats[f"attn{i}"] = probs
    h = self.final_norm(x)
    feats["final"] = h
    return self._logits(h), feats

  def init_cache(self, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
    """An empty (zero) cache for ``batch`` sequences of up to ``length`` (default ``max_len``) tokens,
    keys and values ``[batch, length, num_kv_heads, head_dim]`` in ``dtype`` (default the compute dtype)."""
    length = self.max_len if length is None else length
    if batch < 1 or not 1 <= length <= self.max_len:
      raise ValueError(f"init_cache: need batch >= 1 and 1 <= length <= max_len={self.max_len}, "
                       f"got batch={batch}, length={length}")
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return KVCache.zeros(self.num_layers, shape, dtype)

  def decode(self, tokens: jax.Array, cache: KVCache, positions: jax.Array) -> tuple[jax.Array, KVCache]:
    """Eval-mode forward of new ``tokens [B, T]`` at absolute ``positions`` (``[B, T]`` or ``[T]``).

    Writes their keys/values into ``cache`` (returned updated; the input is not modified) and
    attends to the cached positions ``<=`` each query's (within the window in sliding-window
    layers). Returns ``(logits [B, T, V] float32, cache)``. Positions must lie in
    ``[0, cache.length)`` (not checked: they may be traced).
    """
    tokens = self._check_tokens(tokens, "new tokens")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    cache.check(self.num_layers, b)
    x = self._embed(tokens)
    keys, values = [], []
    for block, k, v in zip(self.layers, cache.keys, cache.values):
      x, _, (k, v) = block(x, positions, cache=(k, v))
      keys.append(k)
      values.append(v)
    return self._logits(self.final_norm(x)), KVCache(keys=tuple(keys), values=tuple(values))
