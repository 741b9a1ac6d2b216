"""Flax NNX model zoo; every model returns ``(logits, feats)``."""

from kdlab.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from kdlab.models.registry import create, names, register
