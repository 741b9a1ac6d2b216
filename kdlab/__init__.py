"""kdlab: knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"

# ``kdlab.generate`` is the function (the module of the same name stays importable with
# ``from kdlab.generate import ...``).
from kdlab.generate import Generation, generate  # noqa: E402
