"""gpt layer scan off: ``scan_layers=True`` keeps the stacked parameters but unrolls the layers in Python
(compile time grows with depth again)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_gpt_precision.py::test_scan_layers_is_one_scan_over_the_blocks",)


def disable() -> None:
  from kdlab.models import gpt

  def unrolled(self, x, feats, *, train, taps):
    for i, block in enumerate(self._layers()):
      x, _, values = block(x, train=train, want_probs=False)
      feats[f"block{i}"] = x
      if f"values{i}" in taps:
        feats[f"values{i}"] = values
    return x

  gpt.GPT._scan = unrolled


pytest_configure = plugin(__name__, disable)
