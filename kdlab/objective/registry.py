"""The term registry: loss names in ``config.objective`` -> term builders.

The built-in terms register themselves when :mod:`kdlab.objective` is imported.
"""

from __future__ import annotations

from typing import Callable

from kdlab.errors import UserError
from kdlab.objective.types import Builder

_BUILDERS: dict[str, tuple[Builder, str]] = {}


def register_term(name: str, *, group: str = "distill") -> Callable[[Builder], Builder]:
  """Registers a term builder under loss name ``name`` (metrics logged as ``<group>/<term name>``).

  A name already registered is refused: pick another name for a new loss.
  """
  if not isinstance(name, str) or not name:
    raise UserError(f"register_term: name={name!r}; give the loss a non-empty name")
  if name in _BUILDERS:
    raise UserError(f"register_term: loss {name!r} is already registered; choose another name "
                    f"(registered: {', '.join(term_names())})")

  def wrap(builder: Builder) -> Builder:
    _BUILDERS[name] = (builder, group)
    return builder

  return wrap


def term_names() -> list[str]:
  """Every registered loss name, sorted."""
  return sorted(_BUILDERS)


def lookup(name: str) -> tuple[Builder, str]:
  """``(builder, group)`` of loss ``name`` (a KeyError when unknown)."""
  return _BUILDERS[name]
