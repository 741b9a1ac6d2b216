"""Model registry: config files refer to models by name.

Every registered constructor builds a Flax NNX module whose call is
``model(x, *, train: bool) -> (logits, feats)``, ``feats`` a dict of named taps.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from flax import nnx

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nnx.Module]], Callable[..., nnx.Module]]:
  """Decorator adding a model constructor to the registry under ``name``."""

  def wrap(fn: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def options(name: str) -> set[str]:
  """The keyword arguments the constructor of ``name`` takes (besides ``rngs``)."""
  if name not in _REGISTRY:
    raise ValueError(f"model: unknown model {name!r}; choose one of {', '.join(names())}")
  return set(inspect.signature(_REGISTRY[name]).parameters) - {"rngs"}


def create(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **kwargs: Any) -> nnx.Module:
  """Builds the zoo model ``name``; ``rngs`` defaults to ``nnx.Rngs(seed)``."""
  if name not in _REGISTRY:
    raise ValueError(f"model: unknown model {name!r}; choose one of {', '.join(names())}")
  return _REGISTRY[name](rngs=rngs if rngs is not None else nnx.Rngs(seed), **kwargs)
