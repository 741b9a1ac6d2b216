"""Applies the feature-off plugin named by ``KDLAB_FEATURE_OFF`` in a child process of a test.

Only on ``PYTHONPATH`` while a feature-off plugin runs (see ``tests/feature_off/__init__.py``).
"""

import importlib
import os

_feature = os.environ.get("KDLAB_FEATURE_OFF")
if _feature:
  importlib.import_module(f"tests.feature_off.{_feature}").disable()
