"""gpt mixed precision off: ``dtype`` is ignored, everything computes in ``param_dtype`` (float32)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_gpt_precision.py::test_bfloat16_compute_over_float32_weights",)


def disable() -> None:
  from kdlab.models import gpt
  as_dtype = gpt.as_dtype
  gpt.as_dtype = lambda value, field: as_dtype("float32" if field == "dtype" else value, field)


pytest_configure = plugin(__name__, disable)
