"""Teacher-generated training data for sequence-level KD (Kim & Rush 2016): ``kdlab generate-data``.

:func:`generate_data` runs ``config.teachers[0]`` over the training prompts (the first ``P``
tokens of every sequence of the train split, in order) and stores its continuations of
``max_new_tokens = N`` tokens, sampled with the settings of ``config.generate_data``::

  config.generate_data = dict(max_new_tokens=64, temperature=1.0, prompt_len=None,  # None: seq_len - N
                              top_k=None, top_p=None, seed=0, source="pysrc")       # source: the prompts' text

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

The arrays are written into ``data.tmp/`` and renamed when complete. ``meta.json`` records the
fingerprint of what the data depend on (the teacher's model config and parameters, the base
source, split, ``seq_len`` and a hash of its packed tokens, and the generation settings): running
the command again with the same fingerprint keeps the data; another fingerprint is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdlab.data import text
from kdlab.errors import UserError

PREFIX = "generated:"
FORMAT = "kdlab-generated-data"
VERSION = 1
FIELD = "config.generate_data"
_KEYS = ("max_new_tokens", "temperature", "prompt_len", "top_k", "top_p", "seed", "source")
_ARRAYS = ("tokens", "targets", "mask")
_OURS = frozenset({"meta.json", "meta.json.tmp", "data", "data.tmp"})


def is_generated(source: Any) -> bool:
  """Whether ``config.data.source`` names a generated dataset (``generated:DIR``)."""
  return isinstance(source, str) and source.startswith(PREFIX)


def _read_meta(out: pathlib.Path) -> dict[str, Any] | None:
  try:
    meta = json.loads((out / "meta.json").read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def open_generated(source: str, *, seq_len: int) -> tuple[text.PackedText, dict[str, Any]]:
  """The finished dataset named by ``source`` (``generated:DIR``) and its ``meta.json``."""
  path = pathlib.Path(source[len(PREFIX):])
  meta = _read_meta(path)
  if meta is None:
    raise UserError(f"config.data.source={source!r}: no finished generated dataset there; build it with "
                    f"kdlab generate-data --config=<config> --out={path}")
  if meta.get("version") != VERSION:
    raise UserError(f"config.data.source={source!r}: format version {meta.get('version')} is not {VERSION}; "
                    f"rebuild it with kdlab generate-data into a new --out directory")
  if meta["seq_len"] != seq_len:
    raise UserError(f"config.data.seq_len={seq_len}: the generated dataset {str(path)!r} holds sequences of "
                    f"{meta['seq_len']} tokens; use config.data.seq_len={meta['seq_len']}")
  try:
    arrays = [np.load(path / "data" / f"{name}.npy", mmap_mode="r") for name in _ARRAYS]
  except (OSError, ValueError):
    raise UserError(f"config.data.source={source!r}: data/ is missing or damaged; rebuild it with kdlab "
                    f"generate-data into a new --out directory") from None
  if any(a.shape != (meta["num_sequences"], seq_len) for a in arrays):
    raise UserError(f"config.data.source={source!r}: data/ does not match meta.json; rebuild it")
  return text.PackedText(*(np.asarray(a) for a in arrays)), meta


def load_splits(source: str, *, seq_len: int, eval_max_bytes: int | None) -> tuple[text.TextSource, text.TextSource]:
  """``(train, validation)`` for ``config.data.source = "generated:DIR"``: the generated sequences,
  and the validation split of the text source the prompts came from."""
  packed, meta = open_generated(source, seq_len=seq_len)
  train = text.TextSource(source, "train", seq_len, int(meta["tokenizer_vocab_size"]), packed)
  try:
    val = text.load_text(meta["source"], "validation", seq_len=seq_len, max_bytes=eval_max_bytes)
  except ValueError as e:
    raise UserError(f"config.data: {e}") from None
  return train, val


# --- building ------------------------------------------------------------------------------------

def settings(config: Any, *, max_len: int | None) -> dict[str, Any]:
  """Validated ``config.generate_data`` (with ``prompt_len`` and ``source`` resolved)."""
  from kdlab.train.on_policy import generation_fields
  spec = config.get("generate_data")
  if not spec:
    raise UserError(f"{FIELD}: missing; set e.g. dict(max_new_tokens=64, temperature=1.0) (the teacher's "
                    f"sampling settings)")
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  seq_len = config.data.get("seq_len")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise UserError(f"config.data.seq_len={seq_len!r}: must be an int >= 2 (tokens per sequence)")
  n, temperature, prompt_len, top_k, top_p = generation_fields(spec, field=FIELD, allowed=_KEYS, max_len=max_len,
                                                               seq_len=seq_len, context="the teacher's")
  seed = spec.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise UserError(f"{FIELD}.seed={seed!r}: must be an int")
  source = spec.get("source") or config.data.source
  if not text.is_text_source(source):
    raise UserError(f"{FIELD}.source={source!r}: the prompts come from a text source; choose one of "
                    f"{', '.join(text.TEXT_SOURCES)}")
  return dict(source=source, seq_len=seq_len, prompt_len=prompt_len, max_new_tokens=n, temperature=temperature,
              top_k=top_k, top_p=top_p, seed=seed)


def _check_out(out: pathlib.Path, fingerprint: str) -> dict[str, Any] | None:
  """The finished dataset's meta if ``out`` holds this one; raises if it holds anything else."""
  meta = _read_meta(out)
  if meta is not None:
    if meta.get("fingerprint") == fingerprint:
      return meta
    raise UserError(f"--out={out}: holds a generated dataset of another teacher, data or generation settings; "
                    f"choose a new --out directory or delete this one")
  if out.exists():
    if not out.is_dir():
      raise UserError(f"--out={out}: is a file; give a directory for the generated dataset")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS)
    if foreign:
      raise UserError(f"--out={out}: is not empty and holds no generated dataset ({foreign[0]!r}, ...); "
                      f"choose a new or empty directory")
  return None


def generate_data(config: Any, out_dir: str | os.PathLike, *, progress: bool = False,
                  config_spec: str | None = None) -> tuple[dict[str, Any], bool]:
  """``kdlab generate-data``: ``config.teachers[0]``'s continuations of the training prompts.

  Generates ``config.data.eval_batch_size`` sequences per call. Returns ``(meta, built)``;
  ``built`` is False when ``out_dir`` already held this dataset (same fingerprint), kept as is.

  Raises:
    UserError: no teacher, bad ``config.generate_data`` fields (a prompt longer than the teacher's
      context among them), a non-text source, or an ``out_dir`` holding something else. Raised
      before anything is written.
  """
  import types

  from flax import nnx

  from kdlab.generate import generate
  from kdlab.teacher_cache import canonical, digest, params_digest, text_digest
  from kdlab.train import checkpoint
  from kdlab.train import mesh as meshlib
  from kdlab.train.loop import _load_teachers, _teacher_spec
  out = pathlib.Path(out_dir)
  if not config.get("teachers"):
    raise UserError("config.teachers: empty; kdlab generate-data samples from config.teachers[0] (init=a finished "
                    "language-model run's checkpoints/ folder)")
  spec = _teacher_spec(config.teachers[0], 0)
  gen = settings(config, max_len=spec["model"].get("max_len"))
  batch_size = config.data.get("eval_batch_size") or config.data.get("batch_size")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"config.data.eval_batch_size={batch_size!r}: must be an int >= 1 (sequences per call)")
  max_bytes = config.data.get("max_bytes")
  try:
    base = text.load_text(gen["source"], "train", seq_len=gen["seq_len"], max_bytes=max_bytes)
  except ValueError as e:
    raise UserError(f"config.data: {e}") from None
  params, _ = checkpoint.load_student_variables(spec["init"], "config.teachers[0].init")
  fingerprint = ";".join([
      f"teacher={digest(canonical(spec['model']), params_digest(params).encode())}",
      f"data={digest(canonical([gen['source'], 'train', gen['seq_len']]), text_digest(base).encode())}",
      f"generation={digest(canonical({k: v for k, v in gen.items() if k not in ('source', 'seq_len')}))}",
  ])
  meta = _check_out(out, fingerprint)
  if meta is not None:
    return meta, False
  mesh = meshlib.make_mesh(config.mesh)
  teachers, variables = _load_teachers(types.SimpleNamespace(teacher_specs=[spec]), mesh)
  teacher = nnx.merge(teachers[0].graphdef, *variables[0])
  vocab = int(spec["model"].get("vocab_size", 0))
  if vocab and int(base.records.tokens.max()) >= vocab:
    raise UserError(f"config.teachers[0]: its vocab_size={vocab} does not cover the tokens of "
                    f"{gen['source']!r}; use the tokenizer the teacher was trained with")

  # Valid: from here on out_dir is written.
  out.mkdir(parents=True, exist_ok=True)
  for leftover in ("data.tmp", "data"):  # an interrupted build
    if (out / leftover).exists():
      shutil.rmtree(out / leftover)
  start = time.time()
  prompts = np.asarray(base.records.tokens[:, :gen["prompt_len"]], np.int32)
  count = len(prompts)
  width = gen["prompt_len"] + gen["max_new_tokens"]
  sequences = np.empty((count, width), np.int32)
  generated = np.empty((count, width), bool)
  key = jax.random.key(gen["seed"])
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=count, desc="generate-data", unit="seq", mininterval=2.0)
  for lo in range(0, count, batch_size):
    rows = np.arange(lo, min(lo + batch_size, count))
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # one compiled batch size
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(padded))
    result = generate(teacher, prompts[padded], max_new_tokens=gen["max_new_tokens"],
                      temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"], key=keys)
    sequences[rows] = np.asarray(result.tokens)[: len(rows)]
    generated[rows] = np.asarray(result.mask)[: len(rows)]
    if bar is not None:
      bar.update(len(rows))
  if bar is not None:
    bar.close()
  pad = ((0, 0), (0, gen["seq_len"] + 1 - width))
  full = np.pad(sequences, pad, constant_values=text.ByteTokenizer.EOD)
  mask = np.pad(generated, pad)[:, 1:].astype(np.float32)
  tmp = out / "data.tmp"
  tmp.mkdir()
  for name, array in zip(_ARRAYS, (full[:, :-1], full[:, 1:], mask)):
    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
  os.replace(tmp, out / "data")
  meta = {
      "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, **gen,
      "num_sequences": count, "generated_tokens": int(mask.sum()),
      "tokenizer_vocab_size": base.vocab_size,
      "created": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "seconds": round(time.time() - start, 3), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "info": {"config": config_spec, "teacher_init": str(pathlib.Path(spec["init"]).absolute()),
               "teacher_model": spec["model"], "max_bytes": max_bytes},
  }
  tmp_meta = out / "meta.json.tmp"
  tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
  os.replace(tmp_meta, out / "meta.json")
  return meta, True
