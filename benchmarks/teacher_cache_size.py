"""Teacher-cache size and reconstruction error at k = 16 / 64 / 256 on briefly trained GPT teachers.

For each vocabulary size V a byte-level GPT (``configs/lm_pysrc.py:teacher`` with d_model 128, 2
layers, ``--steps`` steps of CE on pysrc) is trained, then ``kdlab cache-teacher``'s code
(:func:`kdlab.offline.cache_teacher.cache_teacher`) caches its top k over the first ``--cache-kib``
KiB of the training text. V = 256 is the byte vocabulary the model is trained on; V = 128256 (Llama
3's vocabulary size) is the same model and data with an output layer that large (ids need 17 bits):
training pushes the unused ids down, so the rest mass is spread over a long tail, as in a real LLM.

Reported per (V, k), from the cache's ``meta.json`` and a read-back:
  bits per entry        id bits + value bits of the compact format (kdlab.data.cache_codec)
  bytes/token           the shard files' bytes / cached tokens (what kdlab cache-teacher prints)
  format 1 bytes/token  the float32 format this one replaced: 4k + 2k (uint16 ids) or 4k (int32) + 4
  KL                    mean over every cached token of KL(float32 top-k + rest || decoded), nats
                        (what kdlab cache-teacher prints; measured while writing)
  rest mass             mean teacher mass outside the top k, decoded (what the rest bucket carries)
  lookup ms             median time of ``lookup`` of 32 random sequences x L tokens (read + unpack +
                        decode, page cache warm)

Run (the table in teacher_cache.md):
  .venv/bin/python benchmarks/teacher_cache_size.py --work /tmp/teacher_cache_bench
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kdlab.config import apply_overrides, load  # noqa: E402
from kdlab.data import cache_codec, teacher_cache  # noqa: E402
from kdlab.offline.cache_teacher import cache_teacher  # noqa: E402
from kdlab.train import teachers as teacherlib  # noqa: E402
from kdlab.train.loop import train  # noqa: E402

LM = str(ROOT / "configs" / "lm_pysrc.py")


def _train_teacher(work: pathlib.Path, vocab: int, steps: int, batch: int) -> tuple[pathlib.Path, dict]:
  workdir = work / f"teacher_v{vocab}"
  config = apply_overrides(load(f"{LM}:teacher,steps={steps}"), [
      f"--config.model.vocab_size={vocab}", "--config.model.d_model=128", "--config.model.num_layers=2",
      f"--config.data.batch_size={batch}", "--config.data.eval_batch_size=8", "--config.data.eval_max_bytes=8192",
      "--config.train.eval_every_epochs=100.0", "--config.train.checkpoint_every_epochs=100.0"])
  if not (workdir / "summary.json").exists():
    train(config, workdir, use_wandb=False, progress=False)
  return workdir / "checkpoints", json.loads((workdir / "summary.json").read_text())


def _cache(work: pathlib.Path, init: pathlib.Path, vocab: int, k: int, cache_kib: int) -> dict:
  out = work / f"cache_v{vocab}_k{k}"
  config = apply_overrides(load(f"{LM}:kd-cached,teacher={init},cache={out},k={k}"), [
      f"--config.data.max_bytes={cache_kib << 10}", "--config.data.eval_batch_size=8"])
  start = time.perf_counter()
  meta, _ = cache_teacher(config, out)
  seconds = time.perf_counter() - start
  cache = teacher_cache.open_cache(out, expected_fingerprint=teacherlib.fingerprint(config))
  everything = cache.lookup(np.arange(len(cache)))
  rest_mass = float(np.exp(everything["cache/rest_logprobs"].astype(np.float64)).mean())
  rng = np.random.default_rng(0)
  times = []
  for _ in range(20):
    idx = rng.integers(0, len(cache), 32)
    t = time.perf_counter()
    cache.lookup(idx)
    times.append(time.perf_counter() - t)
  enc = cache_codec.encoding(vocab)
  v1 = 4 * k + (2 if vocab <= 1 << 16 else 4) * k + 4
  return {"vocab": vocab, "k": k, "id_bits": enc.id_bits, "value_bits": enc.value_bits,
          "bytes_per_token": meta["bytes_per_token"], "v1_bytes_per_token": v1,
          "reconstruction_kl": meta["reconstruction_kl"], "rest_mass": rest_mass,
          "lookup_ms": 1e3 * statistics.median(times), "tokens": meta["num_sequences"] * meta["seq_len"],
          "build_s": seconds}


def _table(rows: list[dict], teachers: dict[int, dict], args: argparse.Namespace) -> str:
  lines = [
      "# Teacher cache: bytes per token and reconstruction KL",
      "",
      "Written by `benchmarks/teacher_cache_size.py` (its docstring defines every column). Teachers: "
      "`configs/lm_pysrc.py:teacher` with d_model 128, 2 layers, trained briefly on pysrc bytes "
      f"({', '.join(f'V = {v}: {t['steps']} steps, val_loss {t['val_loss']:.3f} nats/byte' for v, t in teachers.items())}); "
      "cached over the start of the training text in 128-byte sequences "
      f"({', '.join(f'V = {v}: {t['cache_kib']} KiB' for v, t in teachers.items())}; the tokens column).",
      "",
      "| V | k | tokens | bits per entry (id + value) | bytes/token | format 1 bytes/token | KL, nats/token "
      "| rest mass | lookup ms (32 x 128 tokens) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['vocab']:,} | {r['k']} | {r['tokens']:,} | {r['id_bits'] + r['value_bits']} ({r['id_bits']} + {r['value_bits']}) "
                 f"| {r['bytes_per_token']:.1f} | {r['v1_bytes_per_token']} | {r['reconstruction_kl']:.2e} "
                 f"| {r['rest_mass']:.2e} | {r['lookup_ms']:.1f} |")
  lines += [
      "",
      "k = V (256 at V = 256) keeps no rest bucket. Bytes per token include a float64 KL per sequence "
      "(8 / 128 bytes per token) and the .npy headers. Measured "
      f"{time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, shared with other jobs), "
      f"jax {jax.__version__}, backend {jax.default_backend()}.",
      "",
  ]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", required=True, help="folder for the teachers' runs and the caches (reused)")
  parser.add_argument("--vocabs", default="256,128256")
  parser.add_argument("--ks", default="16,64,256")
  parser.add_argument("--steps", default="300,150", help="training steps per vocabulary")
  parser.add_argument("--batch", default="16,4", help="training batch size per vocabulary")
  parser.add_argument("--cache-kib", default="64,16", help="KiB of training text cached per vocabulary (on "
                      "CPU the top-k over 128256 logits dominates the build)")
  parser.add_argument("--md", default=str(ROOT / "benchmarks" / "teacher_cache.md"))
  args = parser.parse_args()
  work = pathlib.Path(args.work)
  vocabs = [int(v) for v in args.vocabs.split(",")]
  steps = dict(zip(vocabs, (int(s) for s in args.steps.split(","))))
  batches = dict(zip(vocabs, (int(b) for b in args.batch.split(","))))
  cache_kib = dict(zip(vocabs, (int(c) for c in args.cache_kib.split(","))))
  rows, teachers = [], {}
  for vocab in vocabs:
    init, summary = _train_teacher(work, vocab, steps[vocab], batches[vocab])
    teachers[vocab] = {"steps": steps[vocab], "val_loss": summary["val_loss"], "cache_kib": cache_kib[vocab]}
    for k in (int(k) for k in args.ks.split(",")):
      rows.append(_cache(work, init, vocab, min(k, vocab), cache_kib[vocab]))
      print(json.dumps(rows[-1]), flush=True)
  pathlib.Path(args.md).write_text(_table(rows, teachers, args))
  print(f"table in {args.md}")


if __name__ == "__main__":
  main()
