"""``generate(model, prompts, ...)``: batched sampling from a language model, jitted end to end.

Prompts are **right-padded**: ``prompts [B, P]`` holds row ``b``'s prompt in its first
``prompt_lengths[b]`` columns (the rest is ignored). The result keeps every token at its own
position: row ``b`` is its prompt, then ``max_new_tokens`` generated tokens from column
``prompt_lengths[b]`` on, then ``pad_id`` up to ``P + max_new_tokens``, so it can be fed straight
to ``model(tokens)`` (e.g. for a teacher to score) with ``mask`` selecting the generated tokens.

With ``use_cache=True`` (the default) one prefill pass over the prompts fills the model's KV
cache, then a ``lax.scan`` runs one cached decode step per new token. ``use_cache=False``
recomputes the model on the whole ``[B, P + max_new_tokens]`` window for every token (static
shapes; causal attention keeps the not-yet-written columns from mattering): the reference the
cached path is tested against, and the baseline of ``benchmarks/generate.py``.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise logits are divided by the
temperature, filtered to the ``top_k`` largest, then to the smallest set of tokens whose
probability reaches ``top_p`` (nucleus), and sampled. Step ``i`` of row ``b`` draws with
``fold_in(key_b, i)`` where ``key_b`` is ``key[b]`` for a ``[B]`` array of keys, else
``fold_in(key, b)``: both paths draw the same tokens, and with per-row keys a row's tokens do
not depend on the rest of the batch.

Under a mesh (``jax.set_mesh``, as training builds the model) the batch axis of the prompts,
the tokens and the cache is split over the data axes (``data``, ``fsdp``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdlab.errors import UserError
from kdlab.mesh import DATA_AXES
from kdlab.models.protocol import Decoder

_REAL = (int, float, np.integer, np.floating)


class Generation(NamedTuple):
  """What :func:`generate` returns.

  Attributes:
    tokens: ``[B, P + max_new_tokens]`` int32: prompt, generated tokens, then padding (see the
      module docstring).
    mask: ``[B, P + max_new_tokens]`` bool, True exactly at the generated tokens.
  """
  tokens: jax.Array
  mask: jax.Array


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _int(x: Any) -> bool:
  return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _real(x: Any) -> bool:
  return not isinstance(x, bool) and isinstance(x, _REAL)


def check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, *, field: str | None = None) -> None:
  """Checks sampling settings; the one check for :func:`generate`, ``config.on_policy`` and
  ``config.generate_data``. Errors name ``field.KEY=VALUE`` when ``field`` is given, else ``KEY``."""

  def bad(key: str, value: Any, rule: str) -> UserError:
    return UserError(f"{field}.{key}={value!r}: must be {rule}" if field else f"{key} must be {rule}, got {value!r}")

  if not _int(max_new_tokens) or max_new_tokens < 1:
    raise bad("max_new_tokens", max_new_tokens, "an int >= 1 (tokens generated per sequence)")
  if not _real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
    raise bad("temperature", temperature, "a number >= 0 (0 = greedy)")
  if top_k is not None and (not _int(top_k) or top_k < 1):
    raise bad("top_k", top_k, "an int >= 1 or None (no filtering)")
  if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
    raise bad("top_p", top_p, "in (0, 1] or None (no filtering)")


def _check(model: nnx.Module, prompts: jax.Array, prompt_lengths: Any, key: Any, max_new_tokens: Any,
           temperature: Any, top_k: Any, top_p: Any) -> None:
  if not isinstance(model, Decoder):
    raise UserError(f"model: {type(model).__name__} has no KV cache (init_cache/decode); use a 'gpt' model")
  check_sampling(max_new_tokens, temperature, top_k, top_p)
  if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer) or 0 in prompts.shape:
    raise UserError(f"prompts: expected [batch, length] integer token ids with batch, length >= 1, "
                    f"got {prompts.dtype} {prompts.shape}")
  b, p = prompts.shape
  if p + max_new_tokens > model.max_len:
    raise UserError(f"prompts: prompt longer than the model's context: prompt length {p} + max_new_tokens "
                    f"{max_new_tokens} = {p + max_new_tokens} > max_len={model.max_len}; shorten the prompts "
                    f"or lower max_new_tokens")
  if prompt_lengths is not None:
    lengths = jnp.asarray(prompt_lengths) if _is_concrete(prompt_lengths) else prompt_lengths
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise UserError(f"prompt_lengths: expected [{b}] integers (one per prompt), got {lengths.dtype} {lengths.shape}")
    if _is_concrete(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > p):
      raise UserError(f"prompt_lengths: every length must be in [1, {p}] (the prompts' width), got "
                      f"[{int(lengths.min())}, {int(lengths.max())}]")
  if temperature > 0:
    if key is None:
      raise UserError("key: sampling (temperature > 0) needs a PRNG key, e.g. key=jax.random.key(0)")
    if _as_key(key).shape not in ((), (b,)):
      raise UserError(f"key: expected one PRNG key or one per prompt ([{b}]), got keys of shape "
                      f"{_as_key(key).shape}")
  mesh = jax.sharding.get_abstract_mesh()
  data = math.prod(mesh.shape[a] for a in DATA_AXES if not mesh.empty and a in mesh.axis_names)
  if b % data:
    raise UserError(f"prompts: batch {b} is not divisible by the data-parallel size {data} of the mesh; "
                    f"use a multiple of {data}")


def _as_key(key: Any) -> jax.Array:
  """A typed PRNG key array (raw ``uint32`` key data is wrapped)."""
  if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """One token per row of ``logits [B, V]``: greedy at temperature 0, else filtered sampling.

  ``key`` is one key per row (``[B]``). Returns ``[B]`` int32.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  vocab = logits.shape[-1]
  if top_k is not None and top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the top token always stays
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)


def _constrain_batch(x: jax.Array) -> jax.Array:
  """Splits ``x``'s leading (batch) axis over the mesh's data axes, if a mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.are_all_axes_explicit:
    return x
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  if not axes:
    return x
  spec = jax.P(axes, *[jax.P.UNCONSTRAINED] * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, spec)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "use_cache", "pad_id"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompts: jax.Array, lengths: jax.Array,
              row_keys: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, use_cache: bool, pad_id: int) -> Generation:
  model = nnx.merge(graphdef, state)
  b, p = prompts.shape
  total = p + max_new_tokens
  rows = jnp.arange(b)
  columns = jnp.arange(total)[None, :]
  prompts = _constrain_batch(prompts)
  tokens = jnp.pad(prompts, ((0, 0), (0, max_new_tokens)))
  tokens = _constrain_batch(jnp.where(columns < lengths[:, None], tokens, pad_id))
  mask = (columns >= lengths[:, None]) & (columns < lengths[:, None] + max_new_tokens)

  def sample(logits: jax.Array, i: jax.Array) -> jax.Array:
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i)
    return sample_logits(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)

  if use_cache:
    cache = jax.tree.map(_constrain_batch, model.init_cache(b, total))
    logits, cache = model.decode(prompts, cache, jnp.arange(p))
    first = sample(logits[rows, lengths - 1], 0)
    tokens = tokens.at[rows, lengths].set(first)

    def step(carry, i):
      tokens, cache, previous = carry
      logits, cache = model.decode(previous[:, None], cache, (lengths + i - 1)[:, None])
      token = sample(logits[:, 0], i)
      return (tokens.at[rows, lengths + i].set(token), cache, token), None

    (tokens, _, _), _ = jax.lax.scan(step, (tokens, cache, first), jnp.arange(1, max_new_tokens))
  else:
    unembedding = model.unembedding()

    def step(tokens, i):
      _, feats = model(tokens, train=False)  # the unused [B, L, V] logits are dead code under jit
      h = feats["final"][rows, lengths + i - 1]
      logits = jnp.matmul(h, unembedding, preferred_element_type=jnp.float32)
      return tokens.at[rows, lengths + i].set(sample(logits, i)), None

    tokens, _ = jax.lax.scan(step, tokens, jnp.arange(max_new_tokens))
  return Generation(tokens=tokens, mask=mask)


def generate(model: nnx.Module, prompts: Any, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, key: Any = None,
             prompt_lengths: Any = None, use_cache: bool = True, pad_id: int = 0) -> Generation:
  """Continues each prompt by ``max_new_tokens`` tokens sampled from ``model`` (eval mode).

  Args:
    model: a language model with a KV cache (``create("gpt", ...)``).
    prompts: ``[B, P]`` int token ids, right-padded when ``prompt_lengths`` is given.
    max_new_tokens: ``N >= 1`` tokens generated per prompt; ``P + N <= model.max_len``.
    temperature: ``>= 0``; 0 is greedy decoding (``top_k``, ``top_p`` and ``key`` unused).
    top_k: keep the ``k`` most likely tokens (None: all).
    top_p: nucleus filtering, ``0 < top_p <= 1`` (None or 1: none).
    key: a PRNG key, or ``[B]`` keys (one per prompt); required when ``temperature > 0``.
    prompt_lengths: ``[B]`` ints in ``[1, P]``, the real length of each prompt (None: all ``P``).
    use_cache: KV-cached decoding (True) or full recomputation per token (False, slow; a reference).
    pad_id: the token written after each row's generated tokens.

  Returns:
    ``Generation(tokens [B, P + N] int32, mask [B, P + N] bool)``; see the module docstring.
    Jitted: one compilation per model structure, shape and sampling setting.
  """
  prompts = jnp.asarray(prompts) if _is_concrete(prompts) else prompts
  _check(model, prompts, prompt_lengths, key, max_new_tokens, temperature, top_k, top_p)
  b, p = prompts.shape
  lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
  key = jax.random.key(0) if key is None else _as_key(key)  # None: greedy, never drawn from
  row_keys = key if key.shape == (b,) else jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(b))
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompts.astype(jnp.int32), lengths, row_keys,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
                   use_cache=bool(use_cache), pad_id=int(pad_id))
