"""Writing run and dataset files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

_PARTIAL = re.compile(r"^\..+\.\d+\.tmp$")


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = False) -> None:
  """Writes ``value`` as indented JSON to ``path`` atomically.

  The text goes to a temporary file beside ``path`` named for this process (parallel writers of
  the same file never share one), then one rename replaces ``path``.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=sort_keys, default=str))
  os.replace(tmp, path)


def is_partial_write(name: str) -> bool:
  """Whether a file name is one :func:`write_json` leaves when killed before its rename."""
  return bool(_PARTIAL.match(name))
