"""kdlab: knowledge distillation in JAX/Flax.

``import kdlab`` is cheap (no JAX); the public names below load their module on first use. The
library's API is documented in docs/extending.md.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "generate": "kdlab.sampling", "Generation": "kdlab.sampling",
    "train": "kdlab.train.loop", "prepare": "kdlab.train.prepare",
}


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
