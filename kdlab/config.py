"""Loading ``configs/<family>.py:<variant>`` files and applying command-line overrides.

An override is ``--config.PATH=VALUE`` where PATH is dotted with list indices,
e.g. ``--config.objective[1].temperature=20``; VALUE is a Python literal
(falls back to a plain string). Only existing fields can be overridden.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import sys
import traceback
from typing import Any, Sequence

import ml_collections

from kdlab.errors import UserError

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def load(spec: str) -> ml_collections.ConfigDict:
  """``"configs/hinton_mnist.py:kd"`` -> that file's ``get_config("kd")``.

  A file that fails to import, a ``get_config`` that raises or returns something other than a
  ``ConfigDict`` (or dict) is a :class:`UserError` naming the file and the Python error.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f"--config: no config file {path!r}; pass e.g. --config=configs/hinton_mnist.py:kd")
  module = load_python_file(file, "kdlab_config", "--config")
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"--config: {path} defines no get_config(arg); add one returning an ml_collections.ConfigDict")
  try:
    config = module.get_config(arg or None)
  except UserError:
    raise
  except ValueError as e:  # The config's own messages (unknown variant or option, bad value).
    raise UserError(f"--config={spec}: {one_line(str(e))}") from None
  except Exception as e:  # noqa: BLE001  (any other failure is a bug in the file: name it, no traceback)
    raise UserError(f"--config={spec}: get_config({arg or None!r}) failed with {python_error(e, file)}; "
                    f"fix {path}") from None
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"--config={spec}: get_config({arg or None!r}) in {path} returned {type(config).__name__}, "
                    f"not an ml_collections.ConfigDict; make it return the config")
  return with_optional_fields(config)


def one_line(text: str) -> str:
  """``text``'s first non-empty line (error messages are one line)."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  return lines[0] if lines else ""


def show(value: Any) -> str:
  """``repr(value)`` on one line (a ``ConfigDict`` shown as its dict), for error messages."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return " ".join(repr(value).split())


def python_error(e: BaseException, file: pathlib.Path) -> str:
  """``"NameError: name 'x' is not defined (line 12 of FILE)"``: an exception raised by user code
  in ``file``, with the line of ``file`` it came from (its last frame there) when known."""
  line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
  if line is None:
    target = file.absolute()
    frames = [f for f in traceback.extract_tb(e.__traceback__) if pathlib.Path(f.filename).absolute() == target]
    line = frames[-1].lineno if frames else None
  text = one_line(e.msg if isinstance(e, SyntaxError) else str(e))
  where = f" (line {line} of {file})" if line is not None else f" (in {file})"
  return f"{type(e).__name__}{': ' + text if text else ''}{where}"


# Fields every loaded run config has, so that ``--config.FIELD=VALUE`` can set them where the file
# leaves them out. ``ADDED_SECTIONS`` are added whole when missing; the ``FILLED_SECTIONS`` only get
# their missing fields (a file without such a section is left without it).
OPTIONAL_FIELDS: dict[str, Any] = {
    "dtype": None,         # compute dtype of the student (e.g. "bfloat16"); None: the model's float32
    "param_dtype": None,   # dtype of the stored (master) parameters; None: float32
    "init_from_teacher": None,  # dict(layers=[0, 2, ...], teacher=0): the student starts as those teacher layers
}
ADDED_SECTIONS: dict[str, dict[str, Any]] = {
    "checkpoint": {"keep": 2, "best_metric": None, "best_mode": None},
}
# Each config.teachers[i] dict: its own sharding rules (None: the student's), stored dtype, and whether a
# checkpoint of a run that has not finished (no summary.json) may be distilled from.
TEACHER_FIELDS: dict[str, Any] = {"sharding_rules": None, "dtype": None, "allow_unfinished": False}
# config.model, by model name: memory and compile-time options of the decoders.
MODEL_FIELDS: dict[str, dict[str, Any]] = {
    "gpt": {"remat": "none", "scan_layers": False},
    **{name: {"remat": "none"} for name in ("hf", "llama", "qwen2", "qwen3", "gemma3")},
}
# Optional sections (None: off), each set as a dict of its fields; an example of each.
SECTIONS: dict[str, str] = {
    "ema_teacher": "{'decay': 0.999}", "born_again": "{'generations': 3, 'ensemble': True}",
    "on_policy": "{'fraction': 0.5, 'max_new_tokens': 16}", "init_from_teacher": "{'layers': [0, 2], 'teacher': 0}",
    "generate_data": "{'max_new_tokens': 64}",
}
FILLED_SECTIONS: dict[str, dict[str, Any]] = {
    # token_normalization: "sequence" (per-sequence token means, then the batch mean) or "global" (one mean
    # per token over the whole global batch: the same under any microbatches and data-parallel size).
    "train": {"microbatches": 1, "max_loss": None, "token_normalization": "sequence"},
    "optimizer": {"clip_grad_norm": None, "kwargs": {}},
}
# config.data of instruction / chat records (kdlab.data.instruct), by source prefix: loss_mask "completion" |
# "last_turn" | "all"; chat_template None (the tokenizer's, when it has one) | True | False | a name;
# teacher_tokenizer "hf:DIR" when the teacher's tokenizer differs (cross-tokenizer distillation).
DATA_FIELDS: dict[str, dict[str, Any]] = {
    prefix: {"loss_mask": "completion", "chat_template": None, "packing": True, "drop_long": False,
             "validation_fraction": 0.05, "teacher_tokenizer": None, "teacher_seq_len": None}
    for prefix in ("jsonl:", "parquet:")
}


def with_optional_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run config (one with a ``model``) with the optional fields it lacks, at their defaults."""
  if "model" not in config:
    return config
  with config.ignore_type():
    for key, value in OPTIONAL_FIELDS.items():
      if key not in config:
        setattr(config, key, value)
    for key, fields in ADDED_SECTIONS.items():
      if key not in config:
        setattr(config, key, ml_collections.ConfigDict(fields))
  for entry in config.get("teachers") or ():
    if isinstance(entry, dict):
      for key, value in TEACHER_FIELDS.items():
        entry.setdefault(key, value)
  model = config.get("model")
  if isinstance(model, ml_collections.ConfigDict):
    with model.ignore_type():
      for key, value in MODEL_FIELDS.get(model.get("name"), {}).items():
        if key not in model:
          setattr(model, key, value)
  data = config.get("data")
  source = data.get("source") if isinstance(data, ml_collections.ConfigDict) else None
  for prefix, fields in DATA_FIELDS.items():
    if isinstance(source, str) and source.startswith(prefix):
      with data.ignore_type():
        for name, value in fields.items():
          if name not in data:
            setattr(data, name, value)
  for key, fields in FILLED_SECTIONS.items():
    section = config.get(key)
    if isinstance(section, ml_collections.ConfigDict):
      with section.ignore_type():
        for name, value in fields.items():
          if name not in section:
            setattr(section, name, ml_collections.ConfigDict(value) if isinstance(value, dict) else value)
  return config


def load_python_file(file: pathlib.Path, prefix: str, field: str = "--config") -> Any:
  """Executes a config or sweep file as a module; its folder is importable meanwhile (configs/common.py).

  A file that does not import (a syntax error, any exception at import) is a :class:`UserError`
  naming it, the Python error and its line; ``field`` is the flag that named the file.
  """
  module_spec = importlib.util.spec_from_file_location(f"{prefix}_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  folder = str(file.parent.absolute())
  sys.path.insert(0, folder)
  try:
    module_spec.loader.exec_module(module)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (whatever the file does wrong, one line naming it)
    raise UserError(f"{field}: {file} does not import: {python_error(e, file)}; fix the file") from None
  finally:
    sys.path.remove(folder)
  return module


def parse_path(path: str) -> list[str | int]:
  """``"objective[1].temperature"`` -> ``["objective", 1, "temperature"]``."""
  parts: list[str | int] = []
  for dotted in path.split("."):
    pos = 0
    for m in _TOKEN.finditer(dotted):
      if m.start() != pos:
        break
      parts.append(m.group(1) if m.group(1) else int(m.group(2)))
      pos = m.end()
    if pos != len(dotted) or not dotted:
      raise UserError(f"--config.{path}: cannot parse the field path (use a.b[0].c)")
  return parts


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """Sets the existing field ``path`` of ``config`` to ``value`` (type-checked).

  A dict given for a config section (``--config.optimizer={'name': 'adam'}``) sets those of its
  fields; other dicts (a model, whose fields depend on its name; an objective term; an empty section
  such as ``optimizer.kwargs``) are replaced.
  """
  parts = parse_path(path)
  nodes: list[Any] = [config]
  for i, key in enumerate(parts[:-1]):
    nodes.append(_child(nodes[-1], key, path, parts[:i + 1]))
  old = _child(nodes[-1], parts[-1], path, parts)
  if isinstance(old, ml_collections.ConfigDict) and len(old) and isinstance(value, dict) and parts[-1] != "model":
    # A section with fields (config.optimizer, config.train, ...): the dict sets some of them.
    for key, item in value.items():
      if not isinstance(key, str) or not key.isidentifier():
        raise UserError(f"--config.{path}={show(value)}: {key!r} is not a field name; give {{'field': value, ...}}")
      override(config, f"{path}.{key}", item)
    return
  if old is not None and value is not None and not _compatible(old, value):
    raise UserError(f"--config.{path}={show(value)}: expected {_describe(old)}")
  if parts in ([name] for name in SECTIONS) and value is not None and not isinstance(value, dict):
    raise UserError(f"--config.{path}={show(value)}: expected None (off) or a dict of its fields, "
                    f"e.g. --config.{path}={SECTIONS[path]}")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  for node, key in zip(reversed(nodes), reversed(parts)):
    if isinstance(node, tuple):  # Immutable: rebuilt with the new entry and set in its parent.
      value = tuple(value if i == key % len(node) else v for i, v in enumerate(node))
    elif isinstance(node, ml_collections.ConfigDict):
      with node.ignore_type():
        setattr(node, key, value)
      return
    else:
      node[key] = value
      return


def _describe(old: Any) -> str:
  """What a value replacing ``old`` must be, in a few words (one line, whatever ``old`` holds)."""
  if isinstance(old, (dict, ml_collections.ConfigDict)):
    return f"a dict of its fields ({', '.join(sorted(old.keys()))})" if len(old) else "a dict"
  if isinstance(old, (list, tuple)):
    return f"a list or tuple like the default {one_line(repr(old))[:80]}"
  return f"a value of type {type(old).__name__} like the default {one_line(repr(old))[:80]}"


def _child(node: Any, key: str | int, path: str, upto: Sequence[str | int]) -> Any:
  where = "config." + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in upto).lstrip(".")
  if isinstance(key, int):
    if not isinstance(node, (list, tuple)) or not -len(node) <= key < len(node):
      raise UserError(f"--config.{path}: {where} does not exist (index out of range or not a list)")
    return node[key]
  if isinstance(node, ml_collections.ConfigDict):
    if key not in node:
      raise UserError(f"--config.{path}: unknown config field {where}; check the spelling "
                      f"(fields here: {', '.join(sorted(node.keys()))})")
    return node[key]
  if isinstance(node, dict):
    if key not in node:
      raise UserError(f"--config.{path}: unknown config field {where}; fields here: {', '.join(sorted(node))}")
    return node[key]
  raise UserError(f"--config.{path}: {where} does not exist")


def _compatible(old: Any, new: Any) -> bool:
  if isinstance(old, bool) or isinstance(new, bool):
    return isinstance(old, bool) and isinstance(new, bool)
  if isinstance(old, (int, float)) and isinstance(new, (int, float)):
    return not (isinstance(old, int) and isinstance(new, float))
  if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
    return True
  if isinstance(old, (dict, ml_collections.ConfigDict)) and isinstance(new, dict):
    return True
  return type(old) is type(new)


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``--config.PATH=VALUE`` arguments; anything else is an error naming it.

  ``data.source`` goes first, then the fields its kind of data has are filled in (:data:`DATA_FIELDS`),
  so e.g. ``--config.data.loss_mask=...`` works on a config whose file reads another source.
  """
  parsed = []
  for arg in args:
    if not arg.startswith("--config.") or "=" not in arg:
      raise UserError(f"unexpected argument {arg!r}; overrides look like --config.FIELD=VALUE")
    path, _, text = arg.removeprefix("--config.").partition("=")
    parsed.append((path, text))
  for path, text in sorted(parsed, key=lambda item: item[0] != "data.source"):  # stable: order kept otherwise
    override(config, path, parse_value(text))
    if path == "data.source":
      with_optional_fields(config)
  return config
