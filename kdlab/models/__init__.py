"""Flax NNX model zoo; every model returns ``(logits, feats)``."""

from kdlab.models import byot as _byot  # noqa: F401  (registers "byot")
from kdlab.models import gemma3 as _gemma3  # noqa: F401  (registers "gemma3")
from kdlab.models import gpt as _gpt  # noqa: F401  (registers "gpt")
from kdlab.models import llama as _llama  # noqa: F401  (registers "llama", "qwen2", "qwen3")
from kdlab.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from kdlab.models import zoo as _zoo  # noqa: F401  (registers the CIFAR zoo)
from kdlab.models.pretrained import from_pretrained, save_pretrained
from kdlab.models.registry import create, names, options, register
