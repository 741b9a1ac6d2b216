"""The model contract, as ``typing.Protocol`` classes the rest of kdlab checks with ``isinstance``.

Every model (:class:`Model`) maps an input batch to ``(logits, feats)``. The optional hooks are
separate protocols, so a model has exactly the ones it implements:

* :class:`OnRequestTaps`: ``tap_names()`` lists taps that are computed only when asked for with
  ``model(x, train=..., taps=(...))`` (e.g. ``gpt``'s ``attn{i}``), because they are costly.
* :class:`Unembedding`: ``unembedding()`` is the ``[D, V]`` matrix with
  ``logits = feats["final"] @ unembedding``; fused large-vocabulary losses read it.
* :class:`Decoder`: ``max_len``, ``init_cache(batch, length)`` and ``decode(tokens, cache, positions)``
  for KV-cache generation (:mod:`kdlab.sampling`) and on-policy distillation.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import jax


@runtime_checkable
class Model(Protocol):
  """``model(x, *, train) -> (logits [B, C] or [B, L, V], feats {name: array})``."""

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]: ...


@runtime_checkable
class OnRequestTaps(Protocol):
  def tap_names(self) -> Sequence[str]: ...


@runtime_checkable
class Unembedding(Protocol):
  def unembedding(self) -> jax.Array: ...


@runtime_checkable
class Decoder(Protocol):
  max_len: int

  def init_cache(self, batch: int, length: int) -> Any: ...

  def decode(self, tokens: jax.Array, cache: Any, positions: jax.Array) -> tuple[jax.Array, Any]: ...
