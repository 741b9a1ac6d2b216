"""``kdlab generate-data``: ``config.teachers[0]``'s continuations of the training prompts (sequence-level KD).

The dataset's layout and reader are :mod:`kdlab.data.generated`: text prompts (the first ``P`` tokens of
each sequence) or, for instruction data, each training example's chat up to the assistant's reply
(:mod:`kdlab.data.prompts`) continued until the teacher's stop token. The teacher is a finished run's
checkpoints or a Hugging Face directory (``init="hf:DIR"``).
"""

from __future__ import annotations

import dataclasses
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
from kdlab.data import instruct, prompts as promptlib
from kdlab.data import text
from kdlab.data.teacher_cache import canonical, digest, text_digest
from kdlab.errors import UserError
from kdlab.sampling import generate
from kdlab.train import on_policy
from kdlab.train import teachers as teacherlib

KEYS = ("max_new_tokens", "temperature", "prompt_len", "top_k", "top_p", "seed", "source")


def settings(config: Any, *, max_len: int | None) -> dict[str, Any]:
  """Validated ``config.generate_data`` (with ``prompt_len`` and ``source`` resolved)."""
  spec = config.get("generate_data")
  if not spec:
    raise UserError(f"{gendata.FIELD}: missing; set e.g. dict(max_new_tokens=64, temperature=1.0) (the teacher's "
                    f"sampling settings)")
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  if config.data.get("teacher_tokenizer"):
    raise UserError(f"{gendata.FIELD}: the generated rows would have no teacher tokenization (cross-tokenizer "
                    f"distillation); unset config.data.teacher_tokenizer to generate, or distil from the data")
  seq_len = config.data.get("seq_len")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise UserError(f"config.data.seq_len={seq_len!r}: must be an int >= 2 (tokens per sequence)")
  source = spec.get("source") or config.data.source
  if not (text.is_text_source(source) or instruct.is_instruct_source(source)):
    raise UserError(f"{gendata.FIELD}.source={source!r}: the prompts come from a text source or instruction data; "
                    f"choose one of {', '.join(text.TEXT_SOURCES)}, jsonl:PATH or parquet:PATH")
  if instruct.is_instruct_source(source) and spec.get("prompt_len") is not None:
    raise UserError(f"{gendata.FIELD}.prompt_len={spec['prompt_len']!r}: the prompts of {source!r} are its examples' "
                    f"own (the chat up to the assistant's reply); leave prompt_len None")
  n, temperature, prompt_len, top_k, top_p = on_policy.generation_fields(
      spec, field=gendata.FIELD, allowed=KEYS, max_len=max_len, seq_len=seq_len, context="the teacher's")
  seed = spec.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise UserError(f"{gendata.FIELD}.seed={seed!r}: must be an int")
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


def _sample_text(teacher: Any, base: Any, gen: dict[str, Any], batch_size: int, bar: Any) -> dict[str, np.ndarray]:
  """Text prompts (each sequence's first ``prompt_len`` tokens) continued by ``max_new_tokens`` tokens."""
  prompts = np.asarray(base.records.tokens[:, :gen["prompt_len"]], np.int32)
  count, width = len(prompts), gen["prompt_len"] + gen["max_new_tokens"]
  sequences = np.empty((count, width), np.int32)
  generated = np.empty((count, width), bool)
  key = jax.random.key(gen["seed"])
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
  pad = ((0, 0), (0, gen["seq_len"] + 1 - width))
  full = np.pad(sequences, pad, constant_values=text.ByteTokenizer.EOD)
  return {"tokens": full[:, :-1], "targets": full[:, 1:], "mask": np.pad(generated, pad)[:, 1:].astype(np.float32)}


def _sample_examples(teacher: Any, base: Any, found: promptlib.Prompts, gen: dict[str, Any], batch_size: int,
                     stop_ids: tuple[int, ...], pad_id: int, bar: Any) -> dict[str, np.ndarray]:
  """Each example's prompt continued until the teacher's stop token: rows of one example each."""
  prompts, lengths = found.tokens(base.records.tokens, pad_id), found.length
  count, seq_len = len(prompts), gen["seq_len"]
  out = {name: np.empty((count, seq_len), np.float32 if name == "mask" else np.int32)
         for name in gendata.ARRAYS + gendata.SEGMENT_ARRAYS}
  key = jax.random.key(gen["seed"])
  for lo in range(0, count, batch_size):
    rows = np.arange(lo, min(lo + batch_size, count))
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # one compiled batch size
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(padded))
    result = generate(teacher, prompts[padded], prompt_lengths=lengths[padded], max_new_tokens=gen["max_new_tokens"],
                      temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"], key=keys,
                      pad_id=pad_id)
    made = on_policy.example_rows(result.tokens, result.mask, seq_len=seq_len, stop_ids=stop_ids, pad_id=pad_id)
    for name, value in zip(gendata.ARRAYS + gendata.SEGMENT_ARRAYS,
                           ("tokens", "targets", "token_mask", "segment_ids", "positions")):
      out[name][rows] = np.asarray(made[value])[: len(rows)]
    if bar is not None:
      bar.update(len(rows))
  return out


def generate_data(config: Any, out_dir: str | os.PathLike, *, progress: bool = False,
                  config_spec: str | None = None) -> tuple[dict[str, Any], bool]:
  """``kdlab generate-data``: ``config.teachers[0]``'s continuations of the training prompts.

  Generates ``config.data.eval_batch_size`` sequences per call. Returns ``(meta, built)``;
  ``built`` is False when ``out_dir`` already held this dataset (same fingerprint), kept as is.

  Raises:
    UserError: no teacher, bad ``config.generate_data`` fields (a prompt longer than the teacher's
      context among them), a source that is neither text nor instruction data, an instruction
      record whose prompt leaves fewer than ``max_new_tokens`` tokens in ``seq_len`` (named), or an
      ``out_dir`` holding something else. Raised before anything is written.
  """
  out = pathlib.Path(out_dir)
  if not config.get("teachers"):
    raise UserError("config.teachers: empty; kdlab generate-data samples from config.teachers[0] (init=a finished "
                    "language-model run's checkpoints/ folder, or hf:DIR)")
  spec = teacherlib.teacher_spec(config.teachers[0], 0)
  gen = settings(config, max_len=spec["model"].get("max_len"))
  batch_size = config.data.get("eval_batch_size") or config.data.get("batch_size")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"config.data.eval_batch_size={batch_size!r}: must be an int >= 1 (sequences per call)")
  max_bytes = config.data.get("max_bytes")
  examples = instruct.is_instruct_source(gen["source"])
  extra: dict[str, Any] = {}
  if examples:  # instruction data: each training example's prompt, replies ending at a stop token
    opts = instruct.options(config.data, gen["seq_len"])
    base = instruct.load(gen["source"], opts)[0]
    found = promptlib.find(base, max_new_tokens=gen["max_new_tokens"], field=gendata.FIELD, loss_mask=opts.loss_mask)
    stop_ids, pad_id = promptlib.stop_tokens(config.data)
    gen["prompt_len"] = None
    extra = {"segments": True, "stop_ids": list(stop_ids), "pad_id": pad_id,
             "instruct": dataclasses.asdict(opts)}
    data_key = [gen["source"], "train", gen["seq_len"], extra["instruct"]]
  else:
    try:
      base = text.load_text(gen["source"], "train", seq_len=gen["seq_len"], max_bytes=max_bytes)
    except ValueError as e:
      raise UserError(f"config.data: {e}") from None
    data_key = [gen["source"], "train", gen["seq_len"]]
  fingerprint = ";".join([
      f"teacher={teacherlib.teacher_digest(spec)}",
      f"data={digest(canonical(data_key), text_digest(base).encode())}",
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
  if examples and found.width + gen["max_new_tokens"] > teacher.max_len:
    raise UserError(f"{gendata.FIELD}: the longest prompt ({found.width} tokens) + max_new_tokens "
                    f"{gen['max_new_tokens']} > the teacher's max_len={teacher.max_len}; lower max_new_tokens or "
                    f"config.data.seq_len")

  # Valid: from here on out_dir is written.
  out.mkdir(parents=True, exist_ok=True)
  for leftover in ("data.tmp", "data"):  # an interrupted build
    if (out / leftover).exists():
      shutil.rmtree(out / leftover)
  start = time.time()
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(found.length) if examples else len(base.records.tokens), desc="generate-data", unit="seq",
               mininterval=2.0)
  if examples:
    arrays = _sample_examples(teacher, base, found, gen, batch_size, stop_ids, pad_id, bar)
    gen["prompt_len"] = found.width  # the longest prompt
  else:
    arrays = _sample_text(teacher, base, gen, batch_size, bar)
  if bar is not None:
    bar.close()
  tmp = out / "data.tmp"
  tmp.mkdir()
  for name, array in arrays.items():
    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
  os.replace(tmp, out / "data")
  meta = {
      "format": gendata.FORMAT, "version": gendata.VERSION, "fingerprint": fingerprint, **gen, **extra,
      "num_sequences": len(arrays["tokens"]), "generated_tokens": int(arrays["mask"].sum()),
      "tokenizer_vocab_size": base.vocab_size,
      "created": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "seconds": round(time.time() - start, 3), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "info": {"config": config_spec, "teacher_init": spec["init"] if spec["init"].startswith(teacherlib.HF_PREFIX)
               else str(pathlib.Path(spec["init"]).absolute()),
               "teacher_model": spec["model"], "max_bytes": max_bytes},
  }
  files.write_json(out / "meta.json", meta, sort_keys=True)
  return meta, True
