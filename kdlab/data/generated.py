"""Teacher-generated training data for sequence-level KD (Kim & Rush 2016): ``kdlab generate-data``.

:func:`kdlab.offline.generate_data.generate_data` runs ``config.teachers[0]`` over the training prompts and
stores its continuations of ``max_new_tokens = N`` tokens, sampled with the settings of
``config.generate_data``::

  config.generate_data = dict(max_new_tokens=64, temperature=1.0, prompt_len=None,  # None: seq_len - N
                              top_k=None, top_p=None, seed=0, source="pysrc")       # source: the prompts' data

Text sources (``pysrc``): the prompts are the first ``P`` tokens of every sequence of the train split,
in order, and every continuation is ``N`` tokens.

Instruction data (``source = "jsonl:PATH"`` / ``"parquet:PATH"``, read with ``config.data``'s tokenizer,
chat template and other fields, :mod:`kdlab.data.instruct`): one row per training example, in order:
its prompt (:mod:`kdlab.data.prompts`: the chat template applied up to the last assistant turn, with
the assistant header) then the teacher's reply, which ends at the first stop token it samples (the
tokenizer's EOS or the template's end-of-turn token, kept), padded with the tokenizer's pad id
(else its EOS). ``mask`` is 1 exactly on the targets that are reply tokens; the rows also carry
``segment_ids`` (1 on prompt and reply, 0 on padding) and ``positions`` (0, 1, ... on them, 0 on
padding), so batches look like the instruction data's. ``prompt_len`` must be None; a prompt that
leaves fewer than ``N`` tokens in ``seq_len`` is an error naming its record, raised before anything
is written. ``meta.json`` keeps ``segments: true``, the ``stop_ids``, ``pad_id`` and the ``instruct``
options the validation split is rebuilt with (``prompt_len`` there is the longest prompt).

Row ``i`` samples with ``fold_in(key(seed), i)``: the data do not depend on the batch size. A
student trains on them with ``config.data.source = "generated:DIR"`` (the language-model task
loads them through :func:`load_splits`): the sequences are packed like text (``tokens``,
``targets`` = next tokens, EOD-padded to ``seq_len``) and ``mask`` is 1 exactly where the target is
a teacher-generated token, so ``ce`` is CE on the teacher's outputs given the prompt (seq-KD) and
``kd`` is token-level KD on them. Validation stays the base source's validation split.

Layout of DIR::

  meta.json            written last (atomically): its presence means "finished"
  data/tokens.npy      int32 [S, L]
  data/targets.npy     int32 [S, L]
  data/mask.npy        float32 [S, L]
  data/segment_ids.npy int32 [S, L]   (instruction data only)
  data/positions.npy   int32 [S, L]   (instruction data only)

The arrays are written into ``data.tmp/`` and renamed when complete. ``meta.json`` records the
fingerprint of what the data depend on (the teacher's model config and parameters, the base
source, split, ``seq_len`` and a hash of its packed tokens, and the generation settings): running
the command again with the same fingerprint keeps the data; another fingerprint is refused.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from kdlab.data import instruct, packing, text
from kdlab.errors import UserError

PREFIX = "generated:"
FORMAT = "kdlab-generated-data"
VERSION = 1
FIELD = "config.generate_data"
ARRAYS = ("tokens", "targets", "mask")
SEGMENT_ARRAYS = ("segment_ids", "positions")  # the rows of instruction data (meta "segments": true)
OWN_FILES = frozenset({"meta.json", "data", "data.tmp"})  # what a (partial) dataset folder holds


def is_generated(source: Any) -> bool:
  """Whether ``config.data.source`` names a generated dataset (``generated:DIR``)."""
  return isinstance(source, str) and source.startswith(PREFIX)


def read_meta(out: pathlib.Path) -> dict[str, Any] | None:
  try:
    meta = json.loads((out / "meta.json").read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def open_generated(source: str, *, seq_len: int) -> tuple[text.PackedText | packing.PackedRows, dict[str, Any]]:
  """The finished dataset named by ``source`` (``generated:DIR``) and its ``meta.json``; the rows of
  instruction data are :class:`kdlab.data.packing.PackedRows` of one example each."""
  path = pathlib.Path(source[len(PREFIX):])
  meta = read_meta(path)
  if meta is None:
    raise UserError(f"config.data.source={source!r}: no finished generated dataset there; build it with "
                    f"kdlab generate-data --config=<config> --out={path}")
  if meta.get("version") != VERSION:
    raise UserError(f"config.data.source={source!r}: format version {meta.get('version')} is not {VERSION}; "
                    f"rebuild it with kdlab generate-data into a new --out directory")
  if meta["seq_len"] != seq_len:
    raise UserError(f"config.data.seq_len={seq_len}: the generated dataset {str(path)!r} holds sequences of "
                    f"{meta['seq_len']} tokens; use config.data.seq_len={meta['seq_len']}")
  names = ARRAYS + (SEGMENT_ARRAYS if meta.get("segments") else ())
  try:
    arrays = [np.load(path / "data" / f"{name}.npy", mmap_mode="r") for name in names]
  except (OSError, ValueError):
    raise UserError(f"config.data.source={source!r}: data/ is missing or damaged; rebuild it with kdlab "
                    f"generate-data into a new --out directory") from None
  if any(a.shape != (meta["num_sequences"], seq_len) for a in arrays):
    raise UserError(f"config.data.source={source!r}: data/ does not match meta.json; rebuild it")
  arrays = [np.asarray(a) for a in arrays]
  if not meta.get("segments"):
    return text.PackedText(*arrays), meta
  tokens, targets, mask, segment_ids, positions = arrays
  count = len(tokens)
  return packing.PackedRows(tokens=tokens, targets=targets, mask=mask, segment_ids=segment_ids, positions=positions,
                            example_row=np.arange(count, dtype=np.int32), example_start=np.zeros(count, np.int32),
                            example_length=(segment_ids > 0).sum(1).astype(np.int32)), meta


def load_splits(source: str, *, seq_len: int, eval_max_bytes: int | None) -> tuple[text.TextSource, text.TextSource]:
  """``(train, validation)`` for ``config.data.source = "generated:DIR"``: the generated sequences,
  and the validation split of the source the prompts came from (instruction data: read with the
  options the dataset was generated with)."""
  packed, meta = open_generated(source, seq_len=seq_len)
  train = text.TextSource(source, "train", seq_len, int(meta["tokenizer_vocab_size"]), packed)
  if meta.get("segments"):
    return train, instruct.load(meta["source"], instruct.Options(**meta["instruct"]))[1]
  try:
    val = text.load_text(meta["source"], "validation", seq_len=seq_len, max_bytes=eval_max_bytes)
  except ValueError as e:
    raise UserError(f"config.data: {e}") from None
  return train, val
