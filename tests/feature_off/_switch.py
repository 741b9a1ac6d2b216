"""What every feature-off plugin shares: patching this process and the ones the tests start."""

from __future__ import annotations

import os
import pathlib
from typing import Callable

ENV_VAR = "KDLAB_FEATURE_OFF"
SITE_DIR = pathlib.Path(__file__).resolve().parent / "site"


def plugin(module_name: str, disable: Callable[[], None]) -> Callable[..., None]:
  """A ``pytest_configure`` hook that calls ``disable()`` here and makes child processes do the same."""
  feature = module_name.rsplit(".", 1)[-1]

  def pytest_configure(config) -> None:
    del config
    disable()
    os.environ[ENV_VAR] = feature
    paths = [str(SITE_DIR), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)

  return pytest_configure
