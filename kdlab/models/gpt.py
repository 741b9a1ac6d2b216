"""Decoder-only transformer language model ("gpt") in Flax NNX.

Pre-norm blocks (RMSNorm by default), rotary position embeddings (RoPE), causal multi-head
attention, a GELU MLP, and a tied or untied unembedding. No biases.

``model(tokens, *, train, taps=()) -> (logits, feats)``:
  * ``tokens``: ``[B, L]`` int32 ids, ``L <= max_len``.
  * ``logits``: ``[B, L, V]`` float32 next-token logits.
  * ``feats`` (always): ``block{i}`` ``[B, L, D]`` hidden state after block i (i from 0), and
    ``final`` ``[B, L, D]``, the final normed hidden state (the unembedding's input, for fused
    losses together with ``model.unembedding()``).
  * ``feats`` (only when named in ``taps``, so not materialized otherwise): ``attn{i}``
    ``[B, H, L, L]`` causal attention probabilities and ``values{i}`` ``[B, H, L, Dh]`` value
    vectors of block i (MiniLM-style attention and value-relation distillation).

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``) through
``nnx.with_partitioning``; rules map them onto mesh axes. Built under a mesh, the parameters are
created sharded (every logical name needs a rule, ``None`` = replicated)::

  rules = [("vocab", "model"), ("heads", "model"), ("mlp", "model"), ("embed", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = create("gpt", ...)

Without a mesh the names stay as metadata (``nnx.get_partition_spec``).

Generation with a KV cache (``kdlab.sampling.generate`` drives it; docs/generation.md)::

  cache = model.init_cache(batch, length)              # zeros, keys/values [B, length, H, Dh]
  logits, cache = model.decode(tokens, cache, positions)

``decode`` runs the ``T`` new tokens ``[B, T]`` at absolute ``positions`` (``[B, T]`` or ``[T]``),
writes their keys and values into the cache at those positions, and attends to every cached
position ``<=`` the query's own (RoPE at the absolute positions): prefill is one call with the
prompt, each generated token one call with ``T = 1``. Its logits equal ``__call__``'s on the same
sequence (eval mode). Cache slots past a query's position are never read, so right-padded
prompts need no mask: a row's padding slots are overwritten by its generated tokens before any
query reaches them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models.registry import register


def _init(std: float, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.are_all_axes_explicit


def _like(x: jax.Array):
  """``x``'s sharding under an explicit mesh (for products contracting a sharded axis), else None."""
  return jax.typeof(x).sharding if _explicit_mesh() else None


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding (rotate-half form) of ``x [B, L, H, Dh]`` at ``positions`` ``[L]`` or ``[B, L]``."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  pos = positions.astype(jnp.float32)
  pos = pos[None] if pos.ndim == 1 else pos
  angle = pos[..., None] * freq  # [B or 1, L, Dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE on queries and keys."""

  def __init__(self, d_model: int, num_heads: int, *, out_std: float, rope_base: float,
               rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.rope_base = num_heads, d_model // num_heads, rope_base
    proj = dict(use_bias=False, kernel_init=_init(0.02, ("embed", "heads")), rngs=rngs)
    self.query = nnx.Linear(d_model, d_model, **proj)
    self.key = nnx.Linear(d_model, d_model, **proj)
    self.value = nnx.Linear(d_model, d_model, **proj)
    self.out = nnx.Linear(d_model, d_model, use_bias=False,
                          kernel_init=_init(out_std, ("heads", "embed")), rngs=rngs)

  def __call__(self, x: jax.Array, *, want_probs: bool) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``x [B, L, D]`` -> (``[B, L, D]``, probabilities ``[B, H, L, L]`` or None, values ``[B, H, L, Dh]``)."""
    b, l, _ = x.shape
    split = lambda y: y.reshape(b, l, self.num_heads, self.head_dim)  # noqa: E731
    pos = jnp.arange(l)
    q = rope(split(self.query(x)), pos, self.rope_base)
    k = rope(split(self.key(x)), pos, self.rope_base)
    v = split(self.value(x))
    if want_probs:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
      causal = jnp.tril(jnp.ones((l, l), bool))
      probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      probs = None
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, l, -1), out_sharding=_like(x)), probs, v.transpose(0, 2, 1, 3)

  def decode(self, x: jax.Array, keys: jax.Array, values: jax.Array,
             positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [B, T, D]`` at ``positions [B, T]``, cache ``keys``/``values [B, S, H, Dh]`` ->
    (``[B, T, D]``, updated keys, updated values)."""
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
    q = rope(split(self.query(x)), positions, self.rope_base)
    k = rope(split(self.key(x)), positions, self.rope_base)
    v = split(self.value(x))
    rows = jnp.arange(b)[:, None]
    keys = keys.at[rows, positions].set(k.astype(keys.dtype))
    values = values.at[rows, positions].set(v.astype(values.dtype))
    visible = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    y = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                     mask=visible[:, None])
    return self.out(y.reshape(b, t, -1), out_sharding=_like(x)), keys, values


class MLP(nnx.Module):
  def __init__(self, d_model: int, hidden: int, *, out_std: float, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, use_bias=False, kernel_init=_init(0.02, ("embed", "mlp")),
                         rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, use_bias=False,
                           kernel_init=_init(out_std, ("mlp", "embed")), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)), out_sharding=_like(x))


def _norm(kind: str, d_model: int, rngs: nnx.Rngs) -> nnx.Module:
  scale = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
  if kind == "rms":
    return nnx.RMSNorm(d_model, scale_init=scale, rngs=rngs)
  if kind == "layer":
    return nnx.LayerNorm(d_model, scale_init=scale,
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
                         rngs=rngs)
  raise ValueError(f"norm: expected 'rms' or 'layer', got {kind!r}")


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, d_model: int, num_heads: int, mlp_hidden: int, *, norm: str, dropout: float,
               out_std: float, rope_base: float, rngs: nnx.Rngs):
    self.norm1 = _norm(norm, d_model, rngs)
    self.attn = Attention(d_model, num_heads, out_std=out_std, rope_base=rope_base, rngs=rngs)
    self.norm2 = _norm(norm, d_model, rngs)
    self.mlp = MLP(d_model, mlp_hidden, out_std=out_std, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, want_probs: bool):
    y, probs, values = self.attn(self.norm1(x), want_probs=want_probs)
    x = x + self.drop(y, deterministic=not train)
    x = x + self.drop(self.mlp(self.norm2(x)), deterministic=not train)
    return x, probs, values

  def decode(self, x: jax.Array, keys: jax.Array, values: jax.Array,
             positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The eval-mode block on new tokens with a KV cache (see :meth:`Attention.decode`)."""
    y, keys, values = self.attn.decode(self.norm1(x), keys, values, positions)
    x = x + y
    return x + self.mlp(self.norm2(x)), keys, values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer keys and values ``[B, S, H, Dh]`` (tuples over layers), a pytree.

  Slot ``s`` holds the key/value of the token at absolute position ``s``; the caller keeps
  track of which positions are filled (``decode`` takes the positions explicitly).
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]

  @property
  def length(self) -> int:
    """``S``, the number of positions the cache holds."""
    return self.keys[0].shape[1]


class GPT(nnx.Module):
  """Decoder-only transformer LM; see the module docstring for the call and its ``feats``."""

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               max_len: int, mlp_ratio: int = 4, tie_embeddings: bool = True, dropout: float = 0.0,
               norm: str = "rms", rope_base: float = 10000.0, rngs: nnx.Rngs):
    if d_model % num_heads or (d_model // num_heads) % 2:
      raise ValueError(f"d_model ({d_model}) must be num_heads ({num_heads}) times an even head size")
    for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers), ("max_len", max_len)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    # Parameters are created sharded (flax's eager sharding) only under a mesh (jax.set_mesh);
    # without one the logical names are kept as metadata for nnx.get_partition_spec.
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self._build(vocab_size, d_model, num_layers, num_heads, max_len, mlp_ratio, tie_embeddings,
                  dropout, norm, rope_base, rngs)

  def _build(self, vocab_size, d_model, num_layers, num_heads, max_len, mlp_ratio, tie_embeddings,
             dropout, norm, rope_base, rngs):
    self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
    self.num_heads, self.max_len, self.tie_embeddings = num_heads, max_len, tie_embeddings
    out_std = 0.02 / math.sqrt(2 * num_layers)  # GPT-2: residual projections scaled by depth
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=_init(0.02, ("vocab", "embed")),
                           rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        Block(d_model, num_heads, mlp_ratio * d_model, norm=norm, dropout=dropout, out_std=out_std,
              rope_base=rope_base, rngs=rngs) for _ in range(num_layers)])
    self.final_norm = _norm(norm, d_model, rngs)
    if not tie_embeddings:
      self.unembed = nnx.Param(_init(0.02, ("embed", "vocab"))(rngs.params(), (d_model, vocab_size)))

  def unembedding(self) -> jax.Array:
    """The ``[D, V]`` unembedding matrix: ``logits = feats["final"] @ model.unembedding()``."""
    if self.tie_embeddings:
      return self.embed.embedding[...].T
    return self.unembed[...]

  def _embed(self, tokens: jax.Array) -> jax.Array:
    # Explicit sharding cannot infer a gather's output from a vocab-sharded table: the rows
    # follow the tokens' sharding, the features stay whole.
    spec = jax.P(*jax.typeof(tokens).sharding.spec, None) if _explicit_mesh() else None
    return self.embed(tokens, out_sharding=spec)

  def tap_names(self) -> list[str]:
    """Every name ``feats`` can hold."""
    per_block = [f"{kind}{i}" for i in range(self.num_layers) for kind in ("block", "attn", "values")]
    return per_block + ["final"]

  def __call__(self, tokens: jax.Array, *, train: bool,
               taps: Sequence[str] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected [batch, length] integer ids, got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
    unknown = sorted(set(taps) - set(self.tap_names()))
    if unknown:
      raise ValueError(f"taps: unknown {unknown}; this model has block0..{self.num_layers - 1}, "
                       f"attn{{i}}, values{{i}}, final")
    x = self.drop(self._embed(tokens), deterministic=not train)
    feats: dict[str, jax.Array] = {}
    for i, block in enumerate(self.blocks):
      x, probs, values = block(x, train=train, want_probs=f"attn{i}" in taps)
      feats[f"block{i}"] = x
      if f"attn{i}" in taps:
        feats[f"attn{i}"] = probs
      if f"values{i}" in taps:
        feats[f"values{i}"] = values
    h = self.final_norm(x)
    feats["final"] = h
    logits = jnp.matmul(h, self.unembedding(), preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32), feats

  def init_cache(self, batch: int, length: int | None = None, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty (zero) cache for ``batch`` sequences of up to ``length`` (default ``max_len``) tokens."""
    length = self.max_len if length is None else length
    if batch < 1 or not 1 <= length <= self.max_len:
      raise ValueError(f"init_cache: need batch >= 1 and 1 <= length <= max_len={self.max_len}, "
                       f"got batch={batch}, length={length}")
    shape = (batch, length, self.num_heads, self.d_model // self.num_heads)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(self.num_layers))  # noqa: E731
    return KVCache(keys=zeros(), values=zeros())

  def decode(self, tokens: jax.Array, cache: KVCache,
             positions: jax.Array) -> tuple[jax.Array, KVCache]:
    """Eval-mode forward of new ``tokens [B, T]`` at absolute ``positions`` (``[B, T]`` or ``[T]``).

    Writes their keys/values into ``cache`` (returned updated, the input is not modified) and
    attends to the cached positions ``<=`` each query's. Returns ``(logits [B, T, V] float32,
    cache)``. Positions must lie in ``[0, cache.length)`` (not checked: they may be traced).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected [batch, new tokens] integer ids, got {tokens.dtype} {tokens.shape}")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    if len(cache.keys) != self.num_layers or cache.keys[0].shape[0] != b:
      raise ValueError(f"cache: expected {self.num_layers} layers of batch {b}, got {len(cache.keys)} "
                       f"of batch {cache.keys[0].shape[0]}; build it with model.init_cache")
    x = self._embed(tokens)
    keys, values = [], []
    for block, k, v in zip(self.blocks, cache.keys, cache.values):
      x, k, v = block.decode(x, k, v, positions)
      keys.append(k)
      values.append(v)
    logits = jnp.matmul(self.final_norm(x), self.unembedding(), preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32), KVCache(keys=tuple(keys), values=tuple(values))


@register("gpt")
def gpt(*, rngs: nnx.Rngs, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
        max_len: int, mlp_ratio: int = 4, tie_embeddings: bool = True, dropout: float = 0.0,
        norm: str = "rms", rope_base: float = 10000.0) -> GPT:
  """``create("gpt", vocab_size=..., d_model=..., num_layers=..., num_heads=..., max_len=...)``."""
  return GPT(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
             max_len=max_len, mlp_ratio=mlp_ratio, tie_embeddings=tie_embeddings, dropout=dropout,
             norm=norm, rope_base=rope_base, rngs=rngs)
