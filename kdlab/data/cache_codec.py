"""The teacher cache's entry format: top-k log-probabilities in 16 bits or fewer, ids in ceil(log2 V) bits.

One token's k entries are k packed fields of ``id_bits + value_bits <= 32`` bits,
``field = id << value_bits | code``:

* ``id_bits = ceil(log2 V)`` (8 for V = 256, 17 for V = 128256);
* ``value_bits = min(16, 32 - id_bits)``: 16 up to V = 65536, 15 up to V = 131072, so that a field
  never takes more than 4 bytes;
* entry i > 0 codes the log-probability relative to the top-1 token, ``log p_i - log p_1`` in
  ``[-RANGE, 0]``, on a uniform grid of ``2^value_bits - 1`` steps (``RANGE / 32767 = 1e-3`` nats
  at 15 bits); entries further below the top-1 are raised to ``-RANGE`` (a mass below
  ``e^-32 ~ 1e-14`` of the top-1's);
* entry 0 (the top-1, whose relative value is always 0) codes instead the log of the mass outside
  the top k relative to the top-1, ``log r - log p_1`` in ``[-RANGE, log V]`` (code 0: no mass,
  ``-inf``, as when ``k = V``).

Decoding normalizes the k + 1 values (softmax), so every category's log-probability carries the
same absolute error, at most half a step: the KL between the float32 top-k and the decoded
distribution is about ``step^2 / 24`` nats per token (4e-8 at 15 bits; a fixed grid relative to the
top-1 spends its precision where KL does, unlike float16 whose error grows with ``|log p|``).

Bit packing is numpy on the host (:func:`pack_bits`, :func:`unpack_bits`); the codes are made on the
device (:func:`encode`, jitted), where the per-token reconstruction KL is measured too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RANGE = 32.0  # nats below the top-1 that a code can reach


@dataclasses.dataclass(frozen=True)
class Encoding:
  """The bit widths and grids of one vocabulary size's fields (:func:`encoding`)."""
  vocab_size: int
  id_bits: int
  value_bits: int

  @property
  def entry_bits(self) -> int:
    return self.id_bits + self.value_bits

  @property
  def max_code(self) -> int:
    return (1 << self.value_bits) - 1

  @property
  def step(self) -> float:
    """Grid step of the top-k values, nats."""
    return RANGE / self.max_code

  @property
  def rest_step(self) -> float:
    """Grid step of the rest mass, nats (codes 1 .. max_code span ``[-RANGE, log V]``)."""
    return (RANGE + math.log(self.vocab_size)) / (self.max_code - 1)

  def to_json(self) -> dict[str, Any]:
    return {"id_bits": self.id_bits, "value_bits": self.value_bits, "entry_bits": self.entry_bits,
            "range_nats": RANGE, "step_nats": self.step, "rest_step_nats": self.rest_step}


def encoding(vocab_size: int) -> Encoding:
  """The :class:`Encoding` of a vocabulary of ``vocab_size`` (2 .. 2^20) tokens."""
  if not 2 <= vocab_size <= 1 << 20:
    raise ValueError(f"vocab_size={vocab_size}: the teacher cache packs vocabularies of 2 to 2^20 tokens")
  id_bits = max(1, math.ceil(math.log2(vocab_size)))
  return Encoding(int(vocab_size), id_bits, min(16, 32 - id_bits))


def row_bytes(count: int, bits: int) -> int:
  """Bytes of ``count`` packed fields of ``bits`` bits."""
  return -(-count * bits // 8)


# --- bit packing (host, numpy) -------------------------------------------------------------------

def pack_bits(fields: np.ndarray, bits: int) -> np.ndarray:
  """``fields [..., n]`` (unsigned, each ``< 2^bits``, ``bits <= 32``) -> ``uint8 [..., ceil(n bits / 8)]``.

  Little-endian bit order: field j takes bits ``[j bits, (j + 1) bits)`` of its row.
  """
  fields = np.asarray(fields)
  if not 1 <= bits <= 32:
    raise ValueError(f"bits={bits}: must be in 1 .. 32")
  *lead, n = fields.shape
  words = np.ascontiguousarray(fields, dtype="<u4")
  if bits in (8, 16, 32):
    return words.astype(f"<u{bits // 8}").view(np.uint8).reshape(*lead, n * bits // 8)
  every = np.unpackbits(words.view(np.uint8).reshape(*lead, n, 4), axis=-1, bitorder="little")
  return np.packbits(every[..., :bits].reshape(*lead, n * bits), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`pack_bits`: ``uint8 [..., nbytes]`` -> ``uint32 [..., count]``."""
  packed = np.asarray(packed, np.uint8)
  *lead, nbytes = packed.shape
  if nbytes != row_bytes(count, bits):
    raise ValueError(f"packed: {nbytes} bytes per row, expected {row_bytes(count, bits)} for {count} x {bits} bits")
  if bits in (8, 16, 32):
    return np.ascontiguousarray(packed).view(f"<u{bits // 8}").astype(np.uint32)
  # Field j starts at bit j bits: read the bytes from there (4 hold it up to 25 bits, else 5) as one
  # little-endian word, then shift and mask.
  width = 4 if bits <= 25 else 5
  word_type = np.uint32 if width == 4 else np.uint64
  rows = np.zeros((int(np.prod(lead, dtype=np.int64)), nbytes + width), np.uint8)
  rows[:, :nbytes] = packed.reshape(-1, nbytes)
  start = np.arange(count, dtype=np.int64) * bits
  first, shift = start >> 3, (start & 7).astype(word_type)
  word = np.zeros((len(rows), count), word_type)
  for i in range(width):
    word |= rows[:, first + i].astype(word_type) << word_type(8 * i)
  return ((word >> shift) & word_type((1 << bits) - 1)).astype(np.uint32).reshape(*lead, count)


# --- values <-> codes ----------------------------------------------------------------------------

def _relative(codes: Any, enc: Encoding, xp: Any) -> tuple[Any, Any]:
  """Codes ``[..., k]`` -> (top-k values relative to the top-1 ``[..., k]``, rest relative ``[...]``)."""
  f32 = xp.float32
  values = codes.astype(f32) * f32(-enc.step)
  values = xp.concatenate([xp.zeros_like(values[..., :1]), values[..., 1:]], axis=-1)
  rest_code = codes[..., 0].astype(f32)
  rest = xp.where(rest_code > 0, f32(-RANGE) + (rest_code - 1) * f32(enc.rest_step), f32(-np.inf))
  return values, rest


def _normalized(values: Any, rest: Any, xp: Any) -> tuple[Any, Any]:
  """Relative values -> log-probabilities of the k + 1 categories (their softmax)."""
  lse = xp.log(xp.exp(values).sum(-1) + xp.exp(rest))  # values[..., 0] = 0 and rest <= log V: no overflow
  return values - lse[..., None], rest - lse


def decode(fields: np.ndarray, enc: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``uint32 [..., k]`` fields -> (log-probs float32 ``[..., k]``, ids int32 ``[..., k]``, rest float32 ``[...]``)."""
  ids = (fields >> np.uint32(enc.value_bits)).astype(np.int32)
  values, rest = _relative(fields & np.uint32(enc.max_code), enc, np)
  with np.errstate(divide="ignore"):
    logprobs, rest = _normalized(values, rest, np)
  return logprobs.astype(np.float32), ids, rest.astype(np.float32)


def encode(logprobs: jax.Array, indices: jax.Array, rest: jax.Array, enc: Encoding) -> tuple[jax.Array, jax.Array]:
  """Top-k of a float32 distribution -> (fields uint32 ``[..., k]``, reconstruction KL float32 ``[...]``).

  Args:
    logprobs: ``[..., k]`` log-probabilities, sorted most likely first.
    indices: ``[..., k]`` their token ids.
    rest: ``[...]`` log of the mass outside the top k (``-inf`` for none).
    enc: the vocabulary's :class:`Encoding`.

  The KL is ``KL(p || q)`` over the k + 1 categories, ``p`` the float32 values (renormalized) and
  ``q`` the decoded ones, summed as ``p (d - 1 + e^-d)`` with ``d = log p - log q`` (each term >= 0,
  so float32 keeps its ~1e-8 size instead of cancelling to noise).
  """
  relative = logprobs - logprobs[..., :1]
  codes = jnp.clip(jnp.round(-relative / enc.step), 0, enc.max_code).astype(jnp.uint32)
  rest_rel = rest - logprobs[..., 0]
  rest_code = jnp.clip(jnp.round((rest_rel + RANGE) / enc.rest_step), 0, enc.max_code - 1).astype(jnp.uint32) + 1
  rest_code = jnp.where(rest == -jnp.inf, jnp.uint32(0), rest_code)
  codes = jnp.concatenate([rest_code[..., None], codes[..., 1:]], axis=-1)
  fields = (indices.astype(jnp.uint32) << enc.value_bits) | codes

  got_values, got_rest = _relative(codes, enc, jnp)
  want = jnp.concatenate([relative, rest_rel[..., None]], axis=-1)
  got = jnp.concatenate([got_values, got_rest[..., None]], axis=-1)
  want_lse = jax.nn.logsumexp(want, axis=-1, keepdims=True)
  got_lse = jax.nn.logsumexp(got, axis=-1, keepdims=True)
  p = jnp.exp(want - want_lse)
  d = jnp.where(p > 0, (want - got) - (want_lse - got_lse), 0.0)
  kl = jnp.sum(jnp.where(p > 0, p * (jnp.expm1(-d) + d), 0.0), axis=-1)
  return fields, kl
