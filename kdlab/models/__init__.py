"""Flax NNX model zoo; every model returns ``(logits, feats)``."""

from kdlab.models import byot as _byot  # noqa: F401  (registers "byot")
from kdlab.models import gpt as _gpt  # noqa: F401  (registers "gpt")
from kdlab.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from kdlab.models import zoo as _zoo  # noqa: F401  (registers the CIFAR zoo)
from kdlab.models.registry import create, names, register
