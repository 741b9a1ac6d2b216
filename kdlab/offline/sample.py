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
import ml_collections
import numpy as np
from flax import nnx

from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError
from kdlab.sampling import generate
from kdlab.train import on_policy, tasks
from kdlab.train import teachers as teacherlib


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
  return teacherlib.load_model(read_lm_config(workdir), pathlib.Path(workdir) / "checkpoints", "--workdir")


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
    raise UserError(f"--max-new-tokens/--max_new_tokens must be >= 1, got {max_new_tokens}")
  if room < 1:
    raise UserError(f"--prompt: prompt longer than the model's context: {len(ids) - 1} bytes + 1 start token "
                    f"leave no room for new tokens under max_len={config['max_len']}; shorten the prompt")
  if max_new_tokens is None:
    max_new_tokens = room
  if max_new_tokens > room:
    raise UserError(f"--prompt: prompt longer than the model's context: {len(ids) - 1} bytes + 1 start token + "
                    f"{max_new_tokens} new tokens > max_len={config['max_len']}; shorten the prompt or lower "
                    f"--max_new_tokens")
  model = load_lm(workdir)
  out = generate(model, ids[None], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, key=jax.random.key(seed))
  new = np.asarray(out.tokens[0, len(ids):])
  ends = np.flatnonzero(new == ByteTokenizer.EOD)
  return prompt + tokenizer.decode(new[: ends[0]] if ends.size else new)


def evaluate_samples(workdir: str | pathlib.Path, *, max_new_tokens: int, prompt_len: int | None = None,
                     num_prompts: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
  """:func:`kdlab.train.on_policy.teacher_nll_of_samples` of a finished LM run's student against its ``config.teachers[0]``.

  Prompts are the first ``prompt_len`` (default ``seq_len - max_new_tokens``) tokens of the
  validation sequences whose first ``prompt_len + max_new_tokens`` targets are all real text
  (``num_prompts`` of them, in order; None for all). Returns its dict plus ``prompts``.
  """
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  if not config.get("teachers"):
    raise UserError(f"--workdir={workdir}: the run has no config.teachers[0] to score its samples with")
  teacher_dir = pathlib.Path(dict(config.teachers[0])["init"]).parent
  seq_len = int(config.data.seq_len)
  prompt_len = seq_len - max_new_tokens if prompt_len is None else prompt_len
  if prompt_len < 1 or prompt_len + max_new_tokens > seq_len:
    raise UserError(f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens}: must fit config.data.seq_len="
                    f"{seq_len} with prompt_len >= 1")
  val = tasks.for_source(config.data.source).load(config.data)[1].records
  full = np.flatnonzero(val.mask[:, :prompt_len + max_new_tokens].min(axis=1) > 0)
  rows = full if num_prompts is None else full[:num_prompts]
  if len(rows) == 0:
    raise UserError(f"--workdir={workdir}: no validation sequence holds {prompt_len + max_new_tokens} real tokens")
  result = on_policy.teacher_nll_of_samples(load_lm(workdir), load_lm(teacher_dir), val.tokens[rows, :prompt_len],
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  key=jax.random.key(seed), batch_size=batch_size)
  return {**result, "prompts": int(len(rows))}
