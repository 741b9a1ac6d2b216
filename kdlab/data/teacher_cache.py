"""Teacher-output cache for language-model distillation: run the teacher once, train from files.

``build_cache`` runs a teacher over every sequence of a packed text split and keeps per token its
top-k log-probabilities (temperature 1), their token ids, and the log of the mass outside the top k
(``rest_logprobs``, exact from the full softmax; ``-inf`` when ``k = V``), in the compact format of
:mod:`kdlab.data.cache_codec`: k fields of ``ceil(log2 V) + min(16, 32 - ceil(log2 V))`` bits per
token (at most 4 bytes per kept entry, the rest mass included; 256 bytes per token at k = 64 and
V = 128256). Training reads them (:meth:`TeacherCache.lookup`, by the batch's sequence ``index``),
decoded on the host to float32 log-probs, int32 ids and float32 rest, for the ``topk_kd`` term.

Sequences are computed in global batches of ``batch_size`` (batch j: ``[j B, (j + 1) B)``). With
several processes each one holds rows ``[lo, hi)`` of every batch (:func:`kdlab.mesh.process_rows`)
and writes them, as its own *part*, to its own shard files; process 0 writes ``meta.json`` when all
are done. Layout of a cache directory::

  meta.json                 written last: its presence means "finished"
  shard-PPP-SSSSS/          part P's sequences (in batch order) [S shard_size, (S + 1) shard_size)
    entries.npy             uint8 [n, ceil(L k bits / 8)]: each sequence's L x k packed fields
    kl.npy                  float64 [n]: each sequence's summed reconstruction KL (nats)
  shard-PPP-SSSSS/ ...

Each shard is written into ``shard-PPP-SSSSS.tmp`` and renamed when complete, and ``meta.json``
is replaced in one step after the last shard, so a killed build leaves no ``meta.json`` and is
never taken for a finished cache; running the same build again keeps its complete shards.
``.npy`` files (not ``.npz``) so that lookups memory-map them. ``meta.json`` records the
reconstruction KL (the mean over all cached tokens of KL(float32 top-k + rest || decoded), nats)
and the bytes per token (the shard files' bytes / cached tokens).

The fingerprint (:func:`kdlab.train.teachers.fingerprint`) names what the cached values depend on: the teacher
(its model config and saved parameters), the tokenizer, the training text (source, split,
sequence length and a hash of the packed tokens) and ``k``. ``open_cache`` refuses a cache
whose recorded fingerprint differs from the one computed from the training config, and a cache
in another format version.
"""

from __future__ import annotations

import dataclasses
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
from jax.sharding import Mesh, NamedSharding

from kdlab import distributed, files
from kdlab import mesh as meshlib
from kdlab.data import cache_codec
from kdlab.errors import UserError
from kdlab.objective.types import CACHE_KEYS

FORMAT = "kdlab-teacher-cache"
VERSION = 2  # 1: float32 values, uint16/int32 ids, one writer
DEFAULT_K = 32
DEFAULT_SHARD_SIZE = 1024
KEYS = CACHE_KEYS  # the batch keys lookup() fills
_ARRAYS = ("entries", "kl")
_SHARD = re.compile(r"^shard-[0-9-]+(\.tmp)?$")  # also version 1's shard-NNNNN, removed by a rebuild
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


# --- layout --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """Where sequence i is stored: part p holds rows ``spans[p] = [lo, hi)`` of every global batch of
  ``batch_size`` sequences, in batch order (its local row ``j (hi - lo) + r - lo`` for sequence
  ``j batch_size + r``), cut into shards of ``shard_size`` local rows. One part: sequence i is local row i."""
  num_sequences: int
  batch_size: int
  spans: tuple[tuple[int, int], ...]
  shard_size: int

  def count(self, part: int) -> int:
    """Sequences in ``part``."""
    lo, hi = self.spans[part]
    full, extra = divmod(self.num_sequences, self.batch_size)
    return full * (hi - lo) + min(max(extra - lo, 0), hi - lo)

  def shards(self, part: int) -> list[tuple[int, int]]:
    """Local row ranges ``[a, b)`` of ``part``'s shards."""
    n = self.count(part)
    return [(a, min(a + self.shard_size, n)) for a in range(0, n, self.shard_size)]

  def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequences ``[b]`` -> (part, shard, row within the shard), each ``[b]``."""
    j, r = np.divmod(np.asarray(indices, np.int64), self.batch_size)
    los = np.array([lo for lo, _ in self.spans])
    widths = np.array([hi - lo for lo, hi in self.spans])
    order = np.argsort(los)
    part = order[np.searchsorted(los[order], r, side="right") - 1]
    shard, row = np.divmod(j * widths[part] + r - los[part], self.shard_size)
    return part, shard, row


def _shard_name(part: int, shard: int) -> str:
  return f"shard-{part:03d}-{shard:05d}"


def _parts(spans: list[tuple[int, int]], batch_size: int, mesh: Mesh | None) -> tuple[tuple[int, int], ...]:
  """The distinct row spans of the processes, checked to tile ``[0, batch_size)``."""
  parts = tuple(dict.fromkeys(spans))  # in process order; a span held by several processes is one part
  covered = sorted(parts)
  if covered[0][0] != 0 or covered[-1][1] != batch_size or any(b != a for (_, b), (a, _) in
                                                               zip(covered, covered[1:])):
    where = f"config.mesh={dict(mesh.shape)}" if mesh is not None else "mesh"
    raise UserError(f"{where}: the processes hold rows {covered} of a batch of {batch_size}, which do not split "
                    f"it into disjoint blocks; order the mesh axes with the data-parallel ones first")
  return parts


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


@functools.partial(jax.jit, static_argnames=("k", "enc", "sharding"))
def _encode_batch(logits: jax.Array, k: int, enc: cache_codec.Encoding,
                  sharding: NamedSharding | None) -> tuple[jax.Array, jax.Array]:
  """``logits [B, L, V] -> (fields uint32 [B, L, k], reconstruction KL float32 [B, L])``, split over
  the batch axis by ``sharding`` (so that each process holds whole rows of its share)."""
  fields, kl = cache_codec.encode(*_topk(logits, k), enc)
  if sharding is not None:
    fields, kl = jax.lax.with_sharding_constraint((fields, kl), sharding)
  return fields, kl


def _local_rows(x: jax.Array, lo: int, hi: int) -> np.ndarray:
  """Rows ``[lo, hi)`` of a batch-sharded array, from this process's shards of it."""
  if x.is_fully_addressable:
    return np.asarray(x)[lo:hi]
  out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
  for shard in x.addressable_shards:
    rows = shard.index[0]
    a, b = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
    if a < hi and b > lo:
      out[max(a, lo) - lo:min(b, hi) - lo] = np.asarray(shard.data)[max(a, lo) - a:min(b, hi) - a]
  return out


def _packing(dataset: Any) -> dict[str, np.ndarray]:
  """``segment_ids`` / ``positions`` ``[N, L]`` of packed instruction rows (the teacher must not attend
  across examples); empty for text packed as one stream."""
  packed = getattr(dataset, "records", dataset)
  return {name: np.asarray(getattr(packed, name)) for name in ("segment_ids", "positions") if hasattr(packed, name)}


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


def _shard_ok(path: pathlib.Path, n: int, nbytes: int) -> bool:
  """Whether a shard folder holds complete arrays for ``n`` sequences of ``nbytes`` packed bytes."""
  want = {"entries": ((n, nbytes), np.uint8), "kl": ((n,), np.float64)}
  try:
    for name, (shape, dtype) in want.items():
      a = np.load(path / f"{name}.npy", mmap_mode="r")
      if a.shape != shape or a.dtype != dtype:
        return False
  except (OSError, ValueError):
    return False
  return True


def _check(apply_fn: Callable[[Any], jax.Array], tokens: np.ndarray, k: Any, out: pathlib.Path,
           fingerprint: str, batch_size: Any, shard_size: Any) -> tuple[int, dict[str, Any] | None]:
  """The checks before anything is written: ``(vocab size, the finished cache to keep or None)``."""
  for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise UserError(f"{name}={value!r}: must be an int >= 1")
  if tokens.ndim != 2 or len(tokens) == 0:
    raise UserError(f"dataset: expected non-empty packed tokens [N, L], got shape {tokens.shape}")
  seq_len = tokens.shape[1]
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
  if not 2 <= vocab <= 1 << 20:
    raise UserError(f"the teacher's vocab size is {vocab}; the teacher cache packs vocabularies of 2 to 2^20 tokens")
  if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
    raise UserError(f"dataset: token ids span [{tokens.min()}, {tokens.max()}] but the teacher's vocab size "
                    f"is {vocab}; use the tokenizer the teacher was trained with")
  meta = _read_meta(out)
  if meta is not None:
    if meta.get("version") != VERSION:
      raise UserError(f"--out={out}: holds a teacher cache in format version {meta.get('version')} (this kdlab "
                      f"writes version {VERSION}); delete it or choose a new --out directory")
    if meta.get("fingerprint") == fingerprint:
      return vocab, meta
    raise UserError(f"--out={out}: holds a finished teacher cache of another teacher, tokenizer, data or k "
                    f"(differs in {', '.join(_differing(meta.get('fingerprint', ''), fingerprint))}); "
                    f"choose a new --out directory or delete this one")
  if out.exists():
    if not out.is_dir():
      raise UserError(f"--out={out}: is a file; give a directory for the teacher cache")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS and not _SHARD.match(p.name)
                     and not files.is_partial_write(p.name))
    if foreign:
      raise UserError(f"--out={out}: is not empty and holds no teacher cache ({foreign[0]!r}, ...); "
                      f"choose a new or empty directory")
  return vocab, None


def build_cache(apply_fn: Callable[[Any], jax.Array], dataset: Any, *, k: int,
                out_dir: str | os.PathLike, fingerprint: str, batch_size: int,
                shard_size: int = DEFAULT_SHARD_SIZE, info: Mapping[str, Any] | None = None,
                progress: bool = False, mesh: Mesh | None = None) -> tuple[dict[str, Any], bool]:
  """Runs the teacher over every sequence of ``dataset`` and writes the cache to ``out_dir``.

  Args:
    apply_fn: ``tokens int32 [B, L] -> logits [B, L, V]`` (packed instruction rows also pass
      ``segment_ids=`` and ``positions=`` int32 ``[B, L]``), jitted (bind the teacher's variables
      as arguments, e.g. ``functools.partial(jax.jit(f), variables)``, not as closed-over
      constants). Without ``mesh`` it is given numpy tokens; with one, global arrays split over
      the mesh's data axes (each process supplies its rows).
    dataset: a packed text split (``PackedText``, or a ``TextSource`` holding one as ``records``):
      its ``tokens [N, L]`` are read; sequence ``i`` of the cache is row ``i``.
    k: tokens kept per position, ``1 <= k <= V``.
    out_dir: the cache directory (created; must be new, empty, an interrupted build, or the same
      finished cache). With several processes, one directory that all of them see (shared).
    fingerprint: :func:`fingerprint` of the config (recorded in ``meta.json``).
    batch_size: sequences per teacher call (global; the last call is padded).
    shard_size: sequences per shard.
    info: extra JSON-able facts recorded in ``meta.json`` (e.g. the teacher path, the config).
    progress: show a progress bar (process 0).
    mesh: the mesh ``apply_fn`` runs on; each process computes and writes its rows of every batch
      (:func:`kdlab.mesh.process_rows`). None: one process, all rows.

  Returns:
    ``(meta, built)``: the cache's ``meta.json`` contents (with ``bytes_per_token`` and
    ``reconstruction_kl``), and False when ``out_dir`` already held this finished cache (same
    fingerprint), which is then reused as is.

  Raises:
    UserError: bad ``k`` (naming ``config.teacher_cache_k``), ``batch_size`` or ``shard_size``; an
      ``out_dir`` holding another finished cache, a cache in another format version, or files that
      are not a cache. Raised on every process (:func:`kdlab.distributed.agree`) before anything is written.
  """
  out = pathlib.Path(out_dir)
  tokens = _tokens(dataset)
  error, kept = None, None
  try:
    vocab, kept = _check(apply_fn, tokens, k, out, fingerprint, batch_size, shard_size)
    span = (0, int(batch_size)) if mesh is None else meshlib.process_rows(mesh, batch_size)
  except UserError as e:
    error = e
  distributed.agree(error)
  if kept is not None:
    return kept, False
  n, seq_len = tokens.shape
  k, batch_size, shard_size = int(k), int(batch_size), int(shard_size)
  spans = [tuple(int(v) for v in s.split(",")) for s in distributed.gather(f"{span[0]},{span[1]}", "cache rows")]
  parts = _parts(spans, batch_size, mesh)
  enc = cache_codec.encoding(vocab)
  layout = Layout(n, batch_size, parts, shard_size)
  plan = {"fingerprint": fingerprint, "k": k, "vocab_size": vocab, "num_sequences": n, "seq_len": seq_len,
          "shard_size": shard_size, "batch_size": batch_size, "parts": [list(p) for p in parts],
          "encoding": enc.to_json()}

  # Valid: from here on out_dir is written.
  building = out / "building.json"
  if distributed.is_writer():
    out.mkdir(parents=True, exist_ok=True)
    try:
      same_plan = building.is_file() and json.loads(building.read_text()) == plan
    except ValueError:
      same_plan = False
    for p in out.iterdir():  # Leftovers of an interrupted build: unfinished shards always, all if another plan.
      if _SHARD.match(p.name) and (p.name.endswith(".tmp") or not same_plan):
        shutil.rmtree(p)
    files.write_json(building, plan, sort_keys=True)
  distributed.barrier("teacher cache prepared")

  start = time.time()
  me = distributed.process_index()
  part = parts.index(span)
  writes = spans.index(span) == me  # The first process holding a span writes it; the others only compute.
  nbytes = cache_codec.row_bytes(seq_len * k, enc.entry_bits)
  width = span[1] - span[0]
  todo = {s: ab for s, ab in enumerate(layout.shards(part))
          if writes and not _shard_ok(out / _shard_name(part, s), ab[1] - ab[0], nbytes)}
  # Every process runs every batch that any process still needs (the teacher is one program over all of them).
  needed = np.zeros(-(-n // batch_size), bool)
  for ranges in distributed.gather(";".join(f"{a // width},{(b - 1) // width + 1}" for a, b in todo.values()),
                                   "cache batches"):
    for r in filter(None, ranges.split(";")):
      a, b = map(int, r.split(","))
      needed[a:b] = True
  bar = None
  if progress and distributed.is_writer():
    from tqdm import tqdm
    bar = tqdm(total=int(needed.sum()) * batch_size, desc="teacher cache", unit="seq", mininterval=2.0)
  sharding = None if mesh is None else meshlib.batch_sharding(mesh)
  open_shards: dict[int, list[Any]] = {}

  def drain(j: int, result: tuple[jax.Array, jax.Array]) -> None:
    count = min(max(n - j * batch_size - span[0], 0), width)  # this part's real rows of batch j
    if bar is not None:
      bar.update(min(batch_size, n - j * batch_size))
    if not writes or count == 0:
      return
    fields, kl = (_local_rows(x, *span)[:count] for x in result)
    packed = cache_codec.pack_bits(fields.reshape(count, seq_len * k), enc.entry_bits)
    kl = kl.astype(np.float64).sum(-1)
    first = j * width  # local row of this batch's first row in the part
    for s, (a, b) in todo.items():
      lo, hi = max(a, first), min(b, first + count)
      if lo >= hi:
        continue
      entries, kls, filled = open_shards.setdefault(s, [np.empty((b - a, nbytes), np.uint8),
                                                        np.empty(b - a, np.float64), 0])
      entries[lo - a:hi - a] = packed[lo - first:hi - first]
      kls[lo - a:hi - a] = kl[lo - first:hi - first]
      open_shards[s][2] = filled + hi - lo
      if open_shards[s][2] == b - a:
        _write_shard(out, _shard_name(part, s), entries, kls)
        del open_shards[s]

  pending = None
  inputs = {"tokens": tokens, **_packing(dataset)}
  for j in np.flatnonzero(needed):
    lo, hi = j * batch_size + span[0], min(j * batch_size + span[1], n)
    x = {}
    for name, values in inputs.items():
      batch = np.zeros((width, seq_len), np.int32)  # The last call padded to the compiled batch size.
      batch[:max(hi - lo, 0)] = values[lo:hi]
      x[name] = batch if mesh is None else jax.make_array_from_process_local_data(sharding, batch)
    # Dispatched asynchronously: the teacher runs while the previous batch is packed and written.
    result = _encode_batch(apply_fn(x.pop("tokens"), **x), k, enc, sharding)
    if pending is not None:
      drain(*pending)
    pending = (int(j), result)
  if pending is not None:
    drain(*pending)
  if bar is not None:
    bar.close()

  distributed.barrier("teacher cache shards")
  if distributed.is_writer():
    folders = [out / _shard_name(p, s) for p in range(len(parts)) for s in range(len(layout.shards(p)))]
    file_bytes = sum((f / f"{name}.npy").stat().st_size for f in folders for name in _ARRAYS)
    kl_sum = sum(float(np.load(f / "kl.npy").sum()) for f in folders)
    meta = {
        "format": FORMAT, "version": VERSION, **plan, "num_shards": len(folders),
        "bytes": file_bytes, "bytes_per_token": file_bytes / (n * seq_len),
        "bytes_per_entry": enc.entry_bits / 8, "reconstruction_kl": kl_sum / (n * seq_len),
        "created": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.time() - start, 3), "host": platform.node(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "processes": distributed.process_count()},
        "info": dict(info or {}),
    }
    files.write_json(out / "meta.json", meta, sort_keys=True)
    building.unlink()
  distributed.barrier("teacher cache finished")
  return json.loads((out / "meta.json").read_text()), True


def _write_shard(out: pathlib.Path, name: str, entries: np.ndarray, kl: np.ndarray) -> None:
  final, tmp = out / name, out / f"{name}.tmp"
  if final.exists():
    shutil.rmtree(final)
  tmp.mkdir()
  np.save(tmp / "entries.npy", entries)
  np.save(tmp / "kl.npy", kl)
  os.replace(tmp, final)


# --- reading -------------------------------------------------------------------------------------

class TeacherCache:
  """A finished cache, memory-mapped: ``lookup(indices)`` gathers and decodes sequences' teacher outputs.

  Attributes:
    path: the cache directory.
    meta: its ``meta.json`` (``k``, ``vocab_size``, ``num_sequences``, ``seq_len``, ``encoding``, ...).
  """

  def __init__(self, path: pathlib.Path, meta: dict[str, Any]):
    self.path, self.meta = path, meta
    self.k, self.vocab_size = int(meta["k"]), int(meta["vocab_size"])
    self.num_sequences, self.seq_len = int(meta["num_sequences"]), int(meta["seq_len"])
    self.encoding = cache_codec.encoding(self.vocab_size)
    self.layout = Layout(self.num_sequences, int(meta["batch_size"]), tuple(tuple(p) for p in meta["parts"]),
                         int(meta["shard_size"]))
    self._nbytes = cache_codec.row_bytes(self.seq_len * self.k, self.encoding.entry_bits)
    fix = "rebuild the cache with kdlab cache-teacher into a new --out directory"
    if meta.get("encoding") != self.encoding.to_json():
      raise UserError(f"config.teacher_cache={str(path)!r}: meta.json's encoding {meta.get('encoding')} is not "
                      f"this kdlab's for V = {self.vocab_size}; {fix}")
    self.shards = {}
    for p in range(len(self.layout.spans)):
      for s, (a, b) in enumerate(self.layout.shards(p)):
        folder = path / _shard_name(p, s)
        if not _shard_ok(folder, b - a, self._nbytes):
          raise UserError(f"config.teacher_cache={str(path)!r}: {folder.name} is missing or damaged; {fix}")
        self.shards[p, s] = np.load(folder / "entries.npy", mmap_mode="r")

  def __len__(self) -> int:
    return self.num_sequences

  def lookup(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Teacher outputs of sequences ``indices [B]`` (positions in the cached split), decoded.

    Returns:
      ``cache/topk_logprobs`` float32 ``[B, L, k]`` (most likely first), ``cache/topk_indices``
      int32 ``[B, L, k]``, ``cache/rest_logprobs`` float32 ``[B, L]`` (``-inf`` when ``k = V``):
      within half a grid step (``meta["encoding"]``) of the float32 values, normalized.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f"indices: expected a [batch] integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_sequences):
      raise IndexError(f"indices: range [{indices.min()}, {indices.max()}] outside the "
                       f"{self.num_sequences} cached sequences")
    packed = np.empty((len(indices), self._nbytes), np.uint8)
    part, shard, row = self.layout.locate(indices)
    key = part * (1 << 32) + shard
    for u in np.unique(key):
      sel = np.flatnonzero(key == u)
      packed[sel] = self.shards[int(u >> 32), int(u & 0xFFFFFFFF)][row[sel]]
    fields = cache_codec.unpack_bits(packed, self.encoding.entry_bits, self.seq_len * self.k)
    decoded = cache_codec.decode(fields.reshape(len(indices), self.seq_len, self.k), self.encoding)
    return dict(zip(KEYS, decoded))


def open_cache(path: str | os.PathLike, *, expected_fingerprint: str) -> TeacherCache:
  """Opens the finished cache at ``path`` (``config.teacher_cache``), checking its version and fingerprint.

  Raises:
    UserError: no finished cache there (never built, or the build was interrupted), one in another
      format version, or one whose fingerprint differs from ``expected_fingerprint`` (another
      teacher, tokenizer, data or k).
  """
  path = pathlib.Path(path)
  fix = f"build it with kdlab cache-teacher --config=<this config> --out={path}"
  meta = _read_meta(path)
  if meta is None:
    why = "an interrupted build (no meta.json)" if (path / "building.json").exists() else "no finished cache"
    raise UserError(f"config.teacher_cache={str(path)!r}: {why} there; {fix}")
  if meta.get("version") != VERSION:
    raise UserError(f"config.teacher_cache={str(path)!r}: a teacher cache in format version {meta.get('version')}, "
                    f"this kdlab reads version {VERSION}; rebuild it with kdlab cache-teacher --config=<this config> "
                    f"--out=NEW_DIR and point config.teacher_cache there")
  if meta.get("fingerprint") != expected_fingerprint:
    differ = ", ".join(_differing(meta.get("fingerprint", ""), expected_fingerprint))
    raise UserError(f"config.teacher_cache={str(path)!r}: built for another teacher, tokenizer, data or k "
                    f"(its fingerprint differs in {differ}); rebuild it with kdlab cache-teacher "
                    f"--config=<this config> --out=NEW_DIR and point config.teacher_cache there")
  return TeacherCache(path, meta)
