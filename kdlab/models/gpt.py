"""Decoder-only transformer language model ("gpt") in Flax NNX.

Pre-norm blocks (RMSNorm by default), rotary position embeddings (RoPE), causal multi-head
attention, a GELU MLP, and a tied or untied unembedding. No biases.

``model(tokens, *, train, taps=(), segment_ids=None, positions=None) -> (logits, feats)``:
  * ``tokens``: ``[B, L]`` int32 ids, ``L <= max_len``.
  * ``segment_ids``, ``positions`` (optional, packed rows): int ``[B, L]``; a query sees a key only
    of its own segment (0 = padding, which attends within the padding) and not after it in the
    row; RoPE rotates to ``positions`` (restarting at each example) instead of ``arange(L)``. The
    mask is built once per call (``kdlab.models.packing.segment_visible``); without either the
    graph is the plain causal one.
  * ``logits``: ``[B, L, V]`` float32 next-token logits.
  * ``feats`` (always): ``block{i}`` ``[B, L, D]`` hidden state after block i (i from 0), and
    ``final`` ``[B, L, D]``, the final normed hidden state (the unembedding's input, for fused
    losses together with ``model.unembedding()``).
  * ``feats`` (only when named in ``taps``, so not materialized otherwise): ``attn{i}``
    ``[B, H, L, L]`` causal attention probabilities and ``values{i}`` ``[B, H, L, Dh]`` value
    vectors of block i (MiniLM-style attention and value-relation distillation).

Precision: ``dtype`` (default ``"float32"``; e.g. ``"bfloat16"``) is the compute dtype of the
matmuls, the residual stream and ``feats``; ``param_dtype`` (default ``"float32"``) the dtype the
parameters are stored in (master weights). Either takes a name or a ``jnp`` dtype. Attention
logits and softmax, and the norms' statistics, are float32 whatever ``dtype``; the unembedding
matmul accumulates into float32 logits. ``attn{i}`` probabilities are float32.

Memory and compile time:
  * ``remat``: ``"none"`` (default), ``"full"`` (each block is recomputed in the backward pass,
    ``nnx.remat``) or ``"dots"`` (recomputed except its matmuls without batch dimensions, i.e.
    the projections: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``). Values and
    gradients are those of ``"none"``.
  * ``scan_layers=True``: the blocks' parameters are stacked on a leading axis (logical name
    ``layers``) and the forward pass is one ``nnx.scan`` over them, so compile time does not grow
    with depth. A model built with ``scan_layers=True`` holds the same values as one built with
    ``False`` from the same seed, stacked (``blocks.<param>[i]`` is block ``i``'s). ``block{i}``
    and ``values{i}`` taps are the scan's per-layer outputs; ``attn{i}`` taps are not available
    under scan (``ValueError``). ``decode`` runs the layers one after another on slices of the
    stacked parameters. The parameter tree differs from ``False``'s (``blocks.attn...`` with a
    leading axis instead of ``blocks.0.attn...``), so checkpoints of one do not restore into the other.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, and a leading
``layers`` on stacked blocks) through ``nnx.with_partitioning``; rules map them onto mesh axes.
Built under a mesh, the parameters are created sharded (every logical name needs a rule, ``None``
= replicated; ``layers`` needs none, that axis is never split)::

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
query reaches them. The cache is stored in the compute ``dtype`` unless ``init_cache`` is given
another.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.models.packing import check_packing, segment_visible
from kdlab.models.registry import register

REMAT = ("none", "full", "dots")
LAYERS = "layers"  # logical name of the stacked blocks' leading axis (scan_layers=True)


def _init(std: float, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.are_all_axes_explicit


def _like(x: jax.Array):
  """``x``'s sharding under an explicit mesh (for products contracting a sharded axis), else None."""
  return jax.typeof(x).sharding if _explicit_mesh() else None


def as_dtype(value: Any, field: str) -> jnp.dtype:
  """``value`` (a name such as ``"bfloat16"`` or a ``jnp`` dtype) as a floating dtype."""
  try:
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{field}: expected a floating dtype such as 'float32' or 'bfloat16', got {value!r}")
  return dtype


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
               precision: dict[str, jnp.dtype], rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.rope_base = num_heads, d_model // num_heads, rope_base
    proj = dict(use_bias=False, kernel_init=_init(0.02, ("embed", "heads")), rngs=rngs, **precision)
    self.query = nnx.Linear(d_model, d_model, **proj)
    self.key = nnx.Linear(d_model, d_model, **proj)
    self.value = nnx.Linear(d_model, d_model, **proj)
    self.out = nnx.Linear(d_model, d_model, use_bias=False,
                          kernel_init=_init(out_std, ("heads", "embed")), rngs=rngs, **precision)

  def __call__(self, x: jax.Array, *, want_probs: bool, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``x [B, L, D]`` -> (``[B, L, D]``, float32 probabilities ``[B, H, L, L]`` or None,
    values ``[B, H, L, Dh]``); ``positions [B, L]`` (default ``arange(L)``) and ``mask [B, L, L]``
    (default causal) for packed rows."""
    b, l, _ = x.shape
    split = lambda y: y.reshape(b, l, self.num_heads, self.head_dim)  # noqa: E731
    pos = jnp.arange(l) if positions is None else positions
    q = rope(split(self.query(x)), pos, self.rope_base)
    k = rope(split(self.key(x)), pos, self.rope_base)
    v = split(self.value(x))
    if want_probs:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      scores = scores / math.sqrt(self.head_dim)
      causal = jnp.tril(jnp.ones((l, l), bool)) if mask is None else mask[:, None]
      probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    elif mask is None:
      probs = None
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # float32 logits and softmax
    else:
      probs = None
      y = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
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
  def __init__(self, d_model: int, hidden: int, *, out_std: float, precision: dict[str, jnp.dtype],
               rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, use_bias=False, kernel_init=_init(0.02, ("embed", "mlp")),
                         rngs=rngs, **precision)
    self.down = nnx.Linear(hidden, d_model, use_bias=False,
                           kernel_init=_init(out_std, ("mlp", "embed")), rngs=rngs, **precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)), out_sharding=_like(x))


def _norm(kind: str, d_model: int, precision: dict[str, jnp.dtype], rngs: nnx.Rngs) -> nnx.Module:
  # flax computes the statistics in (at least) float32 and returns ``precision["dtype"]``.
  scale = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
  if kind == "rms":
    return nnx.RMSNorm(d_model, scale_init=scale, rngs=rngs, **precision)
  if kind == "layer":
    return nnx.LayerNorm(d_model, scale_init=scale,
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
                         rngs=rngs, **precision)
  raise ValueError(f"norm: expected 'rms' or 'layer', got {kind!r}")


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, d_model: int, num_heads: int, mlp_hidden: int, *, norm: str, dropout: float,
               out_std: float, rope_base: float, precision: dict[str, jnp.dtype], rngs: nnx.Rngs):
    self.norm1 = _norm(norm, d_model, precision, rngs)
    self.attn = Attention(d_model, num_heads, out_std=out_std, rope_base=rope_base, precision=precision,
                          rngs=rngs)
    self.norm2 = _norm(norm, d_model, precision, rngs)
    self.mlp = MLP(d_model, mlp_hidden, out_std=out_std, precision=precision, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, want_probs: bool, positions: jax.Array | None = None,
               mask: jax.Array | None = None):
    y, probs, values = self.attn(self.norm1(x), want_probs=want_probs, positions=positions, mask=mask)
    x = x + self.drop(y, deterministic=not train)
    x = x + self.drop(self.mlp(self.norm2(x)), deterministic=not train)
    return x, probs, values

  def decode(self, x: jax.Array, keys: jax.Array, values: jax.Array,
             positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The eval-mode block on new tokens with a KV cache (see :meth:`Attention.decode`)."""
    y, keys, values = self.attn.decode(self.norm1(x), keys, values, positions)
    x = x + y
    return x + self.mlp(self.norm2(x)), keys, values


def _shard_stacked(value: jax.Array, spec: jax.P) -> jax.Array:
  """Lays a freshly stacked parameter out by ``spec`` on the current mesh (eager sharding)."""
  if _explicit_mesh():
    return jax.sharding.reshard(value, spec)
  return jax.lax.with_sharding_constraint(value, spec)


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """One :class:`Block` whose arrays stack ``blocks``' on a new leading axis (``scan_layers``).

  Parameters' logical names get a leading ``layers``; under eager sharding (built under a mesh)
  the stacked parameters keep each block's layout, whole along ``layers``.
  """
  def stack(*variables: nnx.Variable) -> nnx.Variable:
    first = variables[0]
    value = jnp.stack([v.get_value() for v in variables])
    names = first.get_metadata("out_sharding", None)
    if not names:
      return first.replace(value)
    if first.get_metadata("eager_sharding", False):
      value = _shard_stacked(value, jax.P(None, *nnx.get_partition_spec(first).get_value()))
    return first.replace(value, out_sharding=(LAYERS, *names))

  graphdef = nnx.graphdef(blocks[0])
  states = [nnx.state(b) for b in blocks]
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def block_at(stacked: Block, i: int) -> Block:
  """Layer ``i`` of a stacked :class:`Block` (see :func:`stack_blocks`), as a plain block."""
  def take(v: nnx.Variable) -> nnx.Variable:
    names = v.get_metadata("out_sharding", None)
    return v.replace(v.get_value()[i], **({"out_sharding": tuple(names[1:])} if names else {}))

  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(take, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


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

  @classmethod
  def zeros(cls, num_layers: int, shape: tuple[int, ...], dtype: Any) -> "KVCache":
    """An empty cache of ``num_layers`` layers of keys and values of ``shape`` ``[B, S, H, Dh]``."""
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))  # noqa: E731
    return cls(keys=zeros(), values=zeros())

  def check(self, num_layers: int, batch: int) -> None:
    """Raises ``ValueError`` unless this cache has ``num_layers`` layers of ``batch`` rows."""
    if len(self.keys) != num_layers or self.keys[0].shape[0] != batch:
      raise ValueError(f"cache: expected {num_layers} layers of batch {batch}, got {len(self.keys)} "
                       f"of batch {self.keys[0].shape[0]}; build it with model.init_cache")


class GPT(nnx.Module):
  """Decoder-only transformer LM; see the module docstring for the call, ``feats`` and options."""

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               max_len: int, mlp_ratio: int = 4, tie_embeddings: bool = True, dropout: float = 0.0,
               norm: str = "rms", rope_base: float = 10000.0, dtype: Any = "float32",
               param_dtype: Any = "float32", remat: str = "none", scan_layers: bool = False,
               rngs: nnx.Rngs):
    if d_model % num_heads or (d_model // num_heads) % 2:
      raise ValueError(f"d_model ({d_model}) must be num_heads ({num_heads}) times an even head size")
    for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers), ("max_len", max_len)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if remat not in REMAT:
      raise ValueError(f"remat: expected one of {', '.join(map(repr, REMAT))}, got {remat!r}")
    if not isinstance(scan_layers, bool):
      raise ValueError(f"scan_layers: expected True or False, got {scan_layers!r}")
    self.dtype, self.param_dtype = as_dtype(dtype, "dtype"), as_dtype(param_dtype, "param_dtype")
    self.remat, self.scan_layers = remat, scan_layers
    # Parameters are created sharded (flax's eager sharding) only under a mesh (jax.set_mesh);
    # without one the logical names are kept as metadata for nnx.get_partition_spec.
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self._build(vocab_size, d_model, num_layers, num_heads, max_len, mlp_ratio, tie_embeddings,
                  dropout, norm, rope_base, rngs)

  def _build(self, vocab_size, d_model, num_layers, num_heads, max_len, mlp_ratio, tie_embeddings,
             dropout, norm, rope_base, rngs):
    self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
    self.num_heads, self.max_len, self.tie_embeddings = num_heads, max_len, tie_embeddings
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_std = 0.02 / math.sqrt(2 * num_layers)  # GPT-2: residual projections scaled by depth
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=_init(0.02, ("vocab", "embed")),
                           rngs=rngs, **precision)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    blocks = [Block(d_model, num_heads, mlp_ratio * d_model, norm=norm, dropout=dropout, out_std=out_std,
                    rope_base=rope_base, precision=precision, rngs=rngs) for _ in range(num_layers)]
    self.blocks = stack_blocks(blocks) if self.scan_layers else nnx.List(blocks)
    self.final_norm = _norm(norm, d_model, precision, rngs)
    if not tie_embeddings:
      self.unembed = nnx.Param(_init(0.02, ("embed", "vocab"))(rngs.params(), (d_model, vocab_size),
                                                               self.param_dtype))

  def unembedding(self) -> jax.Array:
    """The ``[D, V]`` unembedding matrix in the compute dtype: ``logits = feats["final"] @ model.unembedding()``."""
    if self.tie_embeddings:
      return self.embed.embedding[...].T.astype(self.dtype)
    return self.unembed[...].astype(self.dtype)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    # Explicit sharding cannot infer a gather's output from a vocab-sharded table: the rows
    # follow the tokens' sharding, the features stay whole.
    spec = jax.P(*jax.typeof(tokens).sharding.spec, None) if _explicit_mesh() else None
    return self.embed(tokens, out_sharding=spec)

  def _logits(self, h: jax.Array) -> jax.Array:
    return jnp.matmul(h, self.unembedding(), preferred_element_type=jnp.float32).astype(jnp.float32)

  def tap_names(self) -> list[str]:
    """Every name ``feats`` can hold."""
    per_block = [f"{kind}{i}" for i in range(self.num_layers) for kind in ("block", "attn", "values")]
    return per_block + ["final"]

  def _block_fn(self, *, train: bool, want_probs: bool) -> Callable[..., Any]:
    """``(block, x, positions, mask) -> block(x, ...)``, under ``nnx.remat`` as ``self.remat`` says
    (``positions``/``mask`` None: the unpacked call)."""
    def run(block: Block, x: jax.Array, positions: jax.Array | None, mask: jax.Array | None):
      return block(x, train=train, want_probs=want_probs, positions=positions, mask=mask)

    if self.remat == "none":
      return run
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
    # Inside a scan the loop already keeps the recomputation from being merged away.
    return nnx.remat(run, policy=policy, prevent_cse=not self.scan_layers)

  def __call__(self, tokens: jax.Array, *, train: bool, taps: Sequence[str] = (),
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected [batch, length] integer ids, got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
    unknown = sorted(set(taps) - set(self.tap_names()))
    if unknown:
      raise ValueError(f"taps: unknown {unknown}; this model has block0..{self.num_layers - 1}, "
                       f"attn{{i}}, values{{i}}, final")
    segment_ids, positions = check_packing(segment_ids, positions, tokens.shape)
    mask = None
    if segment_ids is not None or positions is not None:
      segment_ids = jnp.zeros_like(tokens, jnp.int32) if segment_ids is None else segment_ids
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
      mask = segment_visible(segment_ids, positions, None)
    x = self.drop(self._embed(tokens), deterministic=not train)
    feats: dict[str, jax.Array] = {}
    if self.scan_layers:
      x = self._scan(x, feats, train=train, taps=taps, positions=positions, mask=mask)
    else:
      for i, block in enumerate(self.blocks):
        x, probs, values = self._block_fn(train=train, want_probs=f"attn{i}" in taps)(block, x, positions, mask)
        feats[f"block{i}"] = x
        if f"attn{i}" in taps:
          feats[f"attn{i}"] = probs
        if f"values{i}" in taps:
          feats[f"values{i}"] = values
    h = self.final_norm(x)
    feats["final"] = h
    return self._logits(h), feats

  def _scan(self, x: jax.Array, feats: dict[str, jax.Array], *, train: bool, taps: Sequence[str],
            positions: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """The stacked blocks as one ``nnx.scan``; records ``block{i}`` (and requested ``values{i}``)."""
    attn = sorted(t for t in taps if t.startswith("attn"))
    if attn:
      raise ValueError(f"taps: {attn} are not available with scan_layers=True (the scan computes no "
                       f"attention probabilities); build the model with scan_layers=False")
    want_values = any(t.startswith("values") for t in taps)
    run = self._block_fn(train=train, want_probs=False)

    def body(x: jax.Array, block: Block):
      x, _, values = run(block, x, positions, mask)
      return x, (x, values if want_values else None)

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                    transform_metadata={nnx.PARTITION_NAME: LAYERS})
    x, (hidden, values) = scan(x, self.blocks)
    for i in range(self.num_layers):
      feats[f"block{i}"] = hidden[i]
      if f"values{i}" in taps:
        feats[f"values{i}"] = values[i]
    return x

  def _layers(self) -> list[Block]:
    if self.scan_layers:
      return [block_at(self.blocks, i) for i in range(self.num_layers)]
    return list(self.blocks)

  def init_cache(self, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
    """An empty (zero) cache for ``batch`` sequences of up to ``length`` (default ``max_len``)
    tokens, in ``dtype`` (default the model's compute dtype)."""
    length = self.max_len if length is None else length
    if batch < 1 or not 1 <= length <= self.max_len:
      raise ValueError(f"init_cache: need batch >= 1 and 1 <= length <= max_len={self.max_len}, "
                       f"got batch={batch}, length={length}")
    dtype = self.dtype if dtype is None else as_dtype(dtype, "init_cache: dtype")
    shape = (batch, length, self.num_heads, self.d_model // self.num_heads)
    return KVCache.zeros(self.num_layers, shape, dtype)

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
    cache.check(self.num_layers, b)
    x = self._embed(tokens)
    keys, values = [], []
    for block, k, v in zip(self._layers(), cache.keys, cache.values):
      x, k, v = block.decode(x, k, v, positions)
      keys.append(k)
      values.append(v)
    return self._logits(self.final_norm(x)), KVCache(keys=tuple(keys), values=tuple(values))


@register("gpt")
def gpt(*, rngs: nnx.Rngs, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
        max_len: int, mlp_ratio: int = 4, tie_embeddings: bool = True, dropout: float = 0.0,
        norm: str = "rms", rope_base: float = 10000.0, dtype: Any = "float32", param_dtype: Any = "float32",
        remat: str = "none", scan_layers: bool = False) -> GPT:
  """``create("gpt", vocab_size=..., d_model=..., num_layers=..., num_heads=..., max_len=...)``;
  ``dtype``/``param_dtype``/``remat``/``scan_layers`` as in the module docstring."""
  return GPT(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
             max_len=max_len, mlp_ratio=mlp_ratio, tie_embeddings=tie_embeddings, dropout=dropout,
             norm=norm, rope_base=rope_base, dtype=dtype, param_dtype=param_dtype, remat=remat,
             scan_layers=scan_layers, rngs=rngs)
