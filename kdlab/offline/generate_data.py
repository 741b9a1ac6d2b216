"""``kdlab generate-data``: ``config.teachers[0]``'s continuations of the training prompts (sequence-level KD).

The dataset's layout and reader are :mod:`kdlab.data.generated`.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdlab import files
from kdlab import mesh as meshlib
from kdlab.data import generated as gendata
from kdlab.data import text
from kdlab.data.teacher_cache import canonical, digest, params_digest, text_digest
from kdlab.errors import UserError
from kdlab.sampling import generate
from kdlab.train import checkpoint, on_policy
from kdlab.train import teachers as teacherlib

KEYS = ("max_new_tokens", "temperature", "prompt_len", "top_k", "top_p", "seed", "source")


def settings(config: Any, *, max_len: int | None) -> dict[str, Any]:
  """Validated ``config.generate_data`` (with ``prompt_len`` and ``source`` resolved)."""
  spec = config.get("generate_data")
  if not spec:
    raise UserError(f"{gendata.FIELD}: missing; set e.g. dict(max_new_tokens=64, temperature=1.0) (the teacher's "
                    f"sampling settings)")
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  seq_len = config.data.get("seq_len")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise UserError(f"config.data.seq_len={seq_len!r}: must be an int >= 2 (tokens per sequence)")
  n, temperature, prompt_len, top_k, top_p = on_policy.generation_fields(spec, field=gendata.FIELD, allowed=KEYS, max_len=max_len,
                                                               seq_len=seq_len, context="the teacher's")
  seed = spec.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise UserError(f"{gendata.FIELD}.seed={seed!r}: must be an int")
  source = spec.get("source") or config.data.source
  if not text.is_text_source(source):
    raise UserError(f"{gendata.FIELD}.source={source!r}: the prompts come from a text source; choose one of "
                    f"{', '.join(text.TEXT_SOURCES)}")
  return dict(source=source, seq_len=seq_len, prompt_len=prompt_len, max_new_tokens=n, temperature=temperature,
              top_k=top_k, top_p=top_p, seed=seed)


def _check_out(out: pathlib.Path, fingerprint: str) -> dict[str, Any] | None:
  """The finished dataset's meta if ``out`` holds this one; raises if it holds anything else."""
  meta = gendata.read_meta(out)
  if meta is not None:
    if meta.get("fingerprint") == fingerprint:
      return meta
    raise UserError(f"--out={out}: holds a generated dataset of another teacher, data or generation settings; "
                    f"choose a new --out directory or delete this one")
  if out.exists():
    if not out.is_dir():
      raise UserError(f"--out={out}: is a file; give a directory for the generated dataset")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in gendata.OWN_FILES and not files.is_partial_write(p.name))
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
  out = pathlib.Path(out_dir)
  if not config.get("teachers"):
    raise UserError("config.teachers: empty; kdlab generate-data samples from config.teachers[0] (init=a finished "
                    "language-model run's checkpoints/ folder)")
  spec = teacherlib.teacher_spec(config.teachers[0], 0)
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
  teachers, variables = teacherlib.load_teachers([spec], mesh)
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
  for name, array in zip(gendata.ARRAYS, (full[:, :-1], full[:, 1:], mask)):
    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
  os.replace(tmp, out / "data")
  meta = {
      "format": gendata.FORMAT, "version": gendata.VERSION, "fingerprint": fingerprint, **gen,
      "num_sequences": count, "generated_tokens": int(mask.sum()),
      "tokenizer_vocab_size": base.vocab_size,
      "created": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "seconds": round(time.time() - start, 3), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "info": {"config": config_spec, "teacher_init": str(pathlib.Path(spec["init"]).absolute()),
               "teacher_model": spec["model"], "max_bytes": max_bytes},
  }
  files.write_json(out / "meta.json", meta, sort_keys=True)
  return meta, True
