"""``kdlab sample``: continue a text prompt with a finished language-model run's student.

The run's ``config.json`` gives the model (``config.model``, a ``gpt``), its latest checkpoint
the student's parameters (``params["student"]`` of the train state). Text is byte-tokenized
(``kdlab.data.text.ByteTokenizer``) and the prompt is preceded by the end-of-document token, as
the start of a file is in the packed training stream, so an empty prompt starts a new file.
The continuation stops at the first end-of-document token the model produces.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError


def read_lm_config(workdir: str | pathlib.Path) -> dict[str, Any]:
  """The run's ``config.model`` dict, checked to be a byte-level ``gpt``."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise UserError(f"--workdir: no run at {str(workdir)!r} (no config.json); give a finished LM run's workdir")
  model = json.loads(path.read_text()).get("model") or {}
  if model.get("name") != "gpt":
    raise UserError(f"--workdir: {str(workdir)!r} is not a language-model run (config.model.name="
                    f"{model.get('name')!r}); kdlab sample needs a run of a 'gpt' model")
  if model.get("vocab_size") != ByteTokenizer.vocab_size:
    raise UserError(f"--workdir: the run's model has vocab_size={model.get('vocab_size')}, but kdlab sample "
                    f"encodes text as bytes (vocab {ByteTokenizer.vocab_size})")
  return dict(model)


def load_lm(workdir: str | pathlib.Path) -> nnx.Module:
  """The run's student ``gpt`` with the parameters of its latest checkpoint."""
  import kdlab.models.gpt  # noqa: F401  (registers "gpt")
  from kdlab.models import registry
  from kdlab.train.checkpoint import load_student_variables
  kwargs = read_lm_config(workdir)
  try:
    model = registry.create(kwargs.pop("name"), **kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"--workdir: config.model cannot be built: {e}") from None
  saved, _ = load_student_variables(pathlib.Path(workdir) / "checkpoints", "--workdir")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Orbax stores the blocks' list indices as strings: compare paths as strings.
  fresh = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()}
  loaded = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(saved).items()}
  if set(fresh) != set(loaded) or any(np.shape(loaded[k]) != v.shape for k, v in fresh.items()):
    raise UserError(f"--workdir: the checkpoint in {str(workdir)!r} does not match its config.model "
                    f"(different architecture or sizes)")
  nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, saved))
  return nnx.merge(graphdef, params, rest)


def continuation(workdir: str | pathlib.Path, prompt: str, *, max_new_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0) -> str:
  """The prompt followed by the model's continuation, as text.

  ``max_new_tokens`` defaults to the rest of the model's context.
  """
  config = read_lm_config(workdir)
  tokenizer = ByteTokenizer()
  ids = np.concatenate([[ByteTokenizer.EOD], tokenizer.encode(prompt)]).astype(np.int32)
  room = config["max_len"] - len(ids)
  if max_new_tokens is not None and max_new_tokens < 1:
    raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  if room < 1:
    raise UserError(f"--prompt: prompt longer than the model's context: {len(ids) - 1} bytes + 1 start token "
                    f"leave no room for new tokens under max_len={config['max_len']}; shorten the prompt")
  if max_new_tokens is None:
    max_new_tokens = room
  if max_new_tokens > room:
    raise UserError(f"--prompt: prompt longer than the model's context: {len(ids) - 1} bytes + 1 start token + "
                    f"{max_new_tokens} new tokens > max_len={config['max_len']}; shorten the prompt or lower "
                    f"--max_new_tokens")
  from kdlab.generate import generate
  model = load_lm(workdir)
  out = generate(model, ids[None], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, key=jax.random.key(seed))
  new = np.asarray(out.tokens[0, len(ids):])
  ends = np.flatnonzero(new == ByteTokenizer.EOD)
  return prompt + tokenizer.decode(new[: ends[0]] if ends.size else new)
