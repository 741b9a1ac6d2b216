"""Teacher-output cache for language-model distillation: run the teacher once, train from files.

``build_cache`` runs a teacher over every sequence of a packed text split, in order, and keeps
per token its top-k log-probabilities (temperature 1, float32), their token ids, and the log of
the mass outside the top k (``rest_logprobs``, exact from the full softmax; ``-inf`` when
``k = V``). Training then reads them (:meth:`TeacherCache.lookup`, by the batch's sequence
``index``) instead of running the teacher, for the ``topk_kd`` term.

Layout of a cache directory::

  meta.json                 written last: its presence means "finished"
  shard-00000/              sequences [0, shard_size)
    topk_logprobs.npy       float32 [n, L, k]
    topk_indices.npy        uint16 [n, L, k] when V <= 65536, else int32 (lookup gives int32)
    rest_logprobs.npy       float32 [n, L]
  shard-00001/ ...

Each shard is written into ``shard-NNNNN.tmp`` and renamed when complete, and ``meta.json``
is replaced in one step after the last shard, so a killed build leaves no ``meta.json`` and is
never taken for a finished cache; running the same build again keeps its complete shards.
``.npy`` files (not ``.npz``) so that lookups memory-map them.

The fingerprint (:func:`kdlab.train.teachers.fingerprint`) names what the cached values depend on: the teacher
(its model config and saved parameters), the tokenizer, the training text (source, split,
sequence length and a hash of the packed tokens) and ``k``. ``open_cache`` refuses a cache
whose recorded fingerprint differs from the one computed from the training config.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdlab import files
from kdlab.errors import UserError
from kdlab.objective.types import CACHE_KEYS

FORMAT = "kdlab-teacher-cache"
VERSION = 1
DEFAULT_K = 32
DEFAULT_SHARD_SIZE = 1024
KEYS = CACHE_KEYS  # the batch keys lookup() fills
_ARRAYS = ("topk_logprobs", "topk_indices", "rest_logprobs")
_SHARD = re.compile(r"^shard-\d{5}(\.tmp)?$")
_OURS = frozenset({"meta.json", "building.json"})
K_FIELD = "config.teacher_cache_k"


# --- fingerprint ---------------------------------------------------------------------------------

def digest(*parts: bytes) -> str:
  """16 hex digits of the SHA-256 of length-prefixed ``parts``."""
  h = hashlib.sha256()
  for p in parts:
    h.update(len(p).to_bytes(8, "little"))
    h.update(p)
  return h.hexdigest()[:16]


def _array_bytes(x: Any) -> list[bytes]:
  x = np.ascontiguousarray(np.asarray(x))
  return [str(x.dtype).encode(), repr(x.shape).encode(), x.tobytes()]


def params_digest(params: Any) -> str:
  """A hash of a parameter tree's arrays (paths, dtypes, shapes and values)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  parts = []
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    parts += [jax.tree_util.keystr(path).encode(), *_array_bytes(leaf)]
  return digest(*parts)


def text_digest(dataset: Any) -> str:
  """A hash of a packed text split's ``tokens``, ``targets`` and ``mask`` arrays."""
  packed = getattr(dataset, "records", dataset)
  return digest(*_array_bytes(packed.tokens), *_array_bytes(packed.targets), *_array_bytes(packed.mask))


def canonical(value: Any) -> bytes:
  """``value`` as canonical JSON bytes (sorted keys), for :func:`digest`."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def teacher_k(config: Any) -> int:
  """``config.teacher_cache_k`` (default 32), checked to be an int >= 1."""
  k = config.get("teacher_cache_k", DEFAULT_K)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"{K_FIELD}={k!r}: must be an int >= 1 (the teacher's top-k tokens kept per position)")
  return int(k)


def _differing(recorded: str, expected: str) -> list[str]:
  """Names of the fingerprint parts that differ (all parts if either string is not in our format)."""
  def split(fp):
    return dict(p.partition("=")[::2] for p in fp.split(";"))
  a, b = split(recorded), split(expected)
  if set(a) != set(b):
    return sorted(set(a) | set(b))
  return [name for name in b if a[name] != b[name]]


# --- building ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="k")
def _topk(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``logits [B, L, V] -> (topk_logprobs [B, L, k], topk_indices [B, L, k], rest_logprobs [B, L])``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  values, indices = jax.lax.top_k(logp, k)
  if k == logp.shape[-1]:
    rest = jnp.full(logp.shape[:-1], -jnp.inf, jnp.float32)
  else:
    # The mass outside the top k, summed in log space from the full softmax (not 1 - sum p_k,
    # which loses all precision when the top k hold nearly all the mass).
    in_topk = jnp.put_along_axis(jnp.zeros(logp.shape, bool), indices, True, axis=-1, inplace=False)
    rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, logp), axis=-1)
  return values, indices.astype(jnp.int32), rest


def _index_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _tokens(dataset: Any) -> np.ndarray:
  packed = getattr(dataset, "records", dataset)
  if hasattr(packed, "tokens"):
    return np.asarray(packed.tokens)
  return np.stack([np.asarray(packed[i]["tokens"]) for i in range(len(packed))])


def _read_meta(out: pathlib.Path) -> dict[str, Any] | None:
  path = out / "meta.json"
  if not path.is_file():
    return None
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _shard_ok(path: pathlib.Path, n: int, seq_len: int, k: int, index_dtype: np.dtype) -> bool:
  """Whether a kept shard from an interrupted build has the expected arrays."""
  want = {"topk_logprobs": ((n, seq_len, k), np.float32), "topk_indices": ((n, seq_len, k), index_dtype),
          "rest_logprobs": ((n, seq_len), np.float32)}
  try:
    for name, (shape, dtype) in want.items():
      a = np.load(path / f"{name}.npy", mmap_mode="r")
      if a.shape != shape or a.dtype != dtype:
        return False
  except (OSError, ValueError):
    return False
  return True


def build_cache(apply_fn: Callable[[jax.Array], jax.Array], dataset: Any, *, k: int,
                out_dir: str | os.PathLike, fingerprint: str, batch_size: int,
                shard_size: int = DEFAULT_SHARD_SIZE, info: Mapping[str, Any] | None = None,
                progress: bool = False) -> tuple[dict[str, Any], bool]:
  """Runs the teacher over every sequence of ``dataset`` in order and writes the cache to ``out_dir``.

  Args:
    apply_fn: ``tokens int32 [B, L] -> logits [B, L, V]``, jitted (bind the teacher's variables
      as arguments, e.g. ``functools.partial(jax.jit(f), variables)``, not as closed-over
      constants).
    dataset: a packed text split (``PackedText``, or a ``TextSource`` holding one as ``records``):
      its ``tokens [N, L]`` are read; sequence ``i`` of the cache is row ``i``.
    k: tokens kept per position, ``1 <= k <= V``.
    out_dir: the cache directory (created; must be new, empty, an interrupted build, or the same
      finished cache).
    fingerprint: :func:`fingerprint` of the config (recorded in ``meta.json``).
    batch_size: sequences per teacher call (the last call is padded).
    shard_size: sequences per shard.
    info: extra JSON-able facts recorded in ``meta.json`` (e.g. the teacher path, the config).
    progress: show a progress bar.

  Returns:
    ``(meta, built)``: the cache's ``meta.json`` contents, and False when ``out_dir`` already held
    this finished cache (same fingerprint), which is then reused as is.

  Raises:
    UserError: bad ``k`` (naming ``config.teacher_cache_k``), ``batch_size`` or ``shard_size``; an
      ``out_dir`` holding another finished cache or files that are not a cache. Raised before
      anything is written.
  """
  out = pathlib.Path(out_dir)
  for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise UserError(f"{name}={value!r}: must be an int >= 1")
  tokens = _tokens(dataset)
  if tokens.ndim != 2 or len(tokens) == 0:
    raise UserError(f"dataset: expected non-empty packed tokens [N, L], got shape {tokens.shape}")
  n, seq_len = tokens.shape
  try:
    logits = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32))
  except ValueError as e:  # e.g. a sequence longer than the teacher's max_len
    raise UserError(f"the teacher cannot run on [{batch_size}, {seq_len}] tokens (config.data.seq_len): "
                    f"{e}") from None
  if logits.ndim != 3 or logits.shape[:2] != (batch_size, seq_len):
    raise UserError(f"the teacher returned logits of shape {logits.shape}; expected [batch, length, vocab] "
                    f"= [{batch_size}, {seq_len}, V] (a language model)")
  vocab = int(logits.shape[-1])
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= vocab:
    raise UserError(f"{K_FIELD}={k!r}: must be an int in [1, {vocab}] (the teacher's vocab size)")
  if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
    raise UserError(f"dataset: token ids span [{tokens.min()}, {tokens.max()}] but the teacher's vocab size "
                    f"is {vocab}; use the tokenizer the teacher was trained with")
  k = int(k)

  meta = _read_meta(out)
  if meta is not None:
    if meta.get("fingerprint") == fingerprint:
      return meta, False
    raise UserError(f"--out={out}: holds a finished teacher cache of another teacher, tokenizer, data or k "
                    f"(differs in {', '.join(_differing(meta.get('fingerprint', ''), fingerprint))}); "
                    f"choose a new --out directory or delete this one")
  index_dtype = _index_dtype(vocab)
  plan = {"fingerprint": fingerprint, "k": k, "vocab_size": vocab, "num_sequences": n, "seq_len": seq_len,
          "shard_size": int(shard_size), "index_dtype": index_dtype.name}
  if out.exists():
    if not out.is_dir():
      raise UserError(f"--out={out}: is a file; give a directory for the teacher cache")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS and not _SHARD.match(p.name)
                     and not files.is_partial_write(p.name))
    if foreign:
      raise UserError(f"--out={out}: is not empty and holds no teacher cache ({foreign[0]!r}, ...); "
                      f"choose a new or empty directory")

  # Valid: from here on out_dir is written.
  out.mkdir(parents=True, exist_ok=True)
  building = out / "building.json"
  try:
    same_plan = building.is_file() and json.loads(building.read_text()) == plan
  except ValueError:
    same_plan = False
  for p in out.iterdir():  # Leftovers of an interrupted build: unfinished shards always, all if another plan.
    if _SHARD.match(p.name) and (p.name.endswith(".tmp") or not same_plan):
      shutil.rmtree(p)
  files.write_json(building, plan, sort_keys=True)

  start = time.time()
  num_shards = -(-n // shard_size)
  todo = []
  for s in range(num_shards):
    lo, hi = s * shard_size, min((s + 1) * shard_size, n)
    if not _shard_ok(out / f"shard-{s:05d}", hi - lo, seq_len, k, index_dtype):
      todo.append((s, lo, hi))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=sum(hi - lo for _, lo, hi in todo), desc="teacher cache", unit="seq", mininterval=2.0)
  for s, lo, hi in todo:
    final = out / f"shard-{s:05d}"
    if final.exists():
      shutil.rmtree(final)
    buffers = (np.empty((hi - lo, seq_len, k), np.float32), np.empty((hi - lo, seq_len, k), index_dtype),
               np.empty((hi - lo, seq_len), np.float32))
    pending = None

    def drain(pending):
      (a, b), result = pending
      for buf, value in zip(buffers, result):
        buf[a - lo:b - lo] = np.asarray(value)[: b - a]
      if bar is not None:
        bar.update(b - a)

    for a in range(lo, hi, batch_size):
      b = min(a + batch_size, hi)
      batch = tokens[a:b]
      if b - a < batch_size:  # Pad the last call to the compiled batch size.
        batch = np.concatenate([batch, np.zeros((batch_size - (b - a), seq_len), batch.dtype)])
      # Dispatched asynchronously: the teacher runs while the previous batch is copied out.
      result = _topk(apply_fn(np.asarray(batch, np.int32)), k)
      if pending is not None:
        drain(pending)
      pending = ((a, b), result)
    drain(pending)
    tmp = out / f"shard-{s:05d}.tmp"
    tmp.mkdir()
    for name, buf in zip(_ARRAYS, buffers):
      np.save(tmp / f"{name}.npy", buf)
    os.replace(tmp, final)
  if bar is not None:
    bar.close()

  meta = {
      "format": FORMAT, "version": VERSION, **plan, "num_shards": num_shards,
      "created": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "seconds": round(time.time() - start, 3), "host": platform.node(),
                  "python": platform.python_version(), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "info": dict(info or {}),
  }
  files.write_json(out / "meta.json", meta, sort_keys=True)
  building.unlink()
  return meta, True


# --- reading -------------------------------------------------------------------------------------

class TeacherCache:
  """A finished cache, memory-mapped: ``lookup(indices)`` gathers sequences' teacher outputs.

  Attributes:
    path: the cache directory.
    meta: its ``meta.json`` (``k``, ``vocab_size``, ``num_sequences``, ``seq_len``, ...).
  """

  def __init__(self, path: pathlib.Path, meta: dict[str, Any]):
    self.path, self.meta = path, meta
    self.k, self.vocab_size = int(meta["k"]), int(meta["vocab_size"])
    self.num_sequences, self.seq_len = int(meta["num_sequences"]), int(meta["seq_len"])
    self.shard_size = int(meta["shard_size"])
    self.shards = []
    for s in range(int(meta["num_shards"])):
      n = min(self.shard_size, self.num_sequences - s * self.shard_size)
      folder = path / f"shard-{s:05d}"
      if not _shard_ok(folder, n, self.seq_len, self.k, np.dtype(meta["index_dtype"])):
        raise UserError(f"config.teacher_cache={str(path)!r}: {folder.name} is missing or damaged; "
                        f"rebuild the cache with kdlab cache-teacher into a new --out directory")
      self.shards.append(tuple(np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS))

  def __len__(self) -> int:
    return self.num_sequences

  def lookup(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Teacher outputs of sequences ``indices [B]`` (positions in the cached split).

    Returns:
      ``cache/topk_logprobs`` float32 ``[B, L, k]``, ``cache/topk_indices`` int32 ``[B, L, k]``,
      ``cache/rest_logprobs`` float32 ``[B, L]``.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f"indices: expected a [batch] integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_sequences):
      raise IndexError(f"indices: range [{indices.min()}, {indices.max()}] outside the "
                       f"{self.num_sequences} cached sequences")
    b, l, k = len(indices), self.seq_len, self.k
    out = (np.empty((b, l, k), np.float32), np.empty((b, l, k), np.int32), np.empty((b, l), np.float32))
    shard, row = np.divmod(indices, self.shard_size)
    for s in np.unique(shard):
      sel = np.flatnonzero(shard == s)
      rows = row[sel]
      for dst, src in zip(out, self.shards[s]):
        dst[sel] = src[rows]
    return dict(zip(KEYS, out))


def open_cache(path: str | os.PathLike, *, expected_fingerprint: str) -> TeacherCache:
  """Opens the finished cache at ``path`` (``config.teacher_cache``), checking its fingerprint.

  Raises:
    UserError: no finished cache there (never built, or the build was interrupted), or one whose
      fingerprint differs from ``expected_fingerprint`` (another teacher, tokenizer, data or k).
  """
  path = pathlib.Path(path)
  fix = f"build it with kdlab cache-teacher --config=<this config> --out={path}"
  meta = _read_meta(path)
  if meta is None:
    why = "an interrupted build (no meta.json)" if (path / "building.json").exists() else "no finished cache"
    raise UserError(f"config.teacher_cache={str(path)!r}: {why} there; {fix}")
  if meta.get("version") != VERSION:
    raise UserError(f"config.teacher_cache={str(path)!r}: cache format version {meta.get('version')} is not "
                    f"{VERSION}; rebuild it with kdlab cache-teacher into a new --out directory")
  if meta.get("fingerprint") != expected_fingerprint:
    differ = ", ".join(_differing(meta.get("fingerprint", ""), expected_fingerprint))
    raise UserError(f"config.teacher_cache={str(path)!r}: built for another teacher, tokenizer, data or k "
                    f"(its fingerprint differs in {differ}); rebuild it with kdlab cache-teacher "
                    f"--config=<this config> --out=NEW_DIR and point config.teacher_cache there")
  return TeacherCache(path, meta)


