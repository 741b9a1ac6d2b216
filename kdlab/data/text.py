"""Text sources for language models: a byte-level tokenizer and the ``pysrc`` corpus.

``pysrc`` is the running interpreter's standard library ``.py`` files: real text that is always
present, nothing to download. Files are split into train/validation by a stable hash of their
path relative to the stdlib root (md5; about ``validation_fraction`` of the files go to
validation), read in sorted order, tokenized and packed into fixed-length sequences.

Packing (``pack``): the documents (files) are concatenated into one stream, each followed by an
end-of-document token (``ByteTokenizer.EOD`` = byte 0, which source text does not contain), and
cut into windows of ``seq_len + 1`` tokens that overlap by one (GPT-2 style packing):
``tokens = window[:-1]``, ``targets = window[1:]``. A window may span a file boundary: attention
then sees the previous file's end, and the model learns to predict the end-of-document token
(the first token after it is predicted from the previous file's context; no reset). The last
window is padded with ``EOD`` and its padding targets get ``mask = 0``; every real target has
``mask = 1``.

The result (``PackedText``) is a random-access sequence of dicts ``{"tokens": int32 [L],
"targets": int32 [L], "mask": float32 [L]}``, usable as ``grain.MapDataset.source(...)``;
``.tokens`` / ``.targets`` / ``.mask`` hold the ``[N, L]`` arrays.

Tokenizers (``config.data.tokenizer``): ``"byte"`` (default, ``ByteTokenizer``) or ``"hf:DIR"``, a
Hugging Face tokenizer folder (``kdlab.data.hf_tokenizer``): each file is decoded as UTF-8,
encoded without added special tokens, and documents end with the tokenizer's ``eos_token``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
  from kdlab.data.hf_tokenizer import HFTokenizer

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, nothing to train or download."""

  vocab_size = 256
  EOD = 0  # end of document; NUL does not occur in text

  def encode(self, text: str) -> np.ndarray:
    """``str`` -> ``int32 [n]`` byte values."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Token ids -> ``str`` (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"ids: byte tokens must be in [0, 255], got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class PackedText:
  """Packed sequences: ``tokens``, ``targets`` int32 ``[N, L]``, ``mask`` float32 ``[N, L]``."""

  tokens: np.ndarray
  targets: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[i], "targets": self.targets[i], "mask": self.mask[i]}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return (self[i] for i in range(len(self)))

  @property
  def num_tokens(self) -> int:
    """Real (unmasked) target tokens."""
    return int(self.mask.sum())


def pack(docs: Iterable[np.ndarray], seq_len: int, *, eod: int = ByteTokenizer.EOD) -> PackedText:
  """Packs token arrays into ``[N, seq_len]`` (inputs, shifted targets, mask); see module doc."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  parts = []
  for d in docs:
    parts += [np.asarray(d, np.int32), np.array([eod], np.int32)]
  stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  n = max(0, -(-(len(stream) - 1) // seq_len))  # windows needed to cover every target
  padded = np.full(n * seq_len + 1, eod, np.int32)
  padded[: len(stream)] = stream
  index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  windows = padded[index]  # [N, L + 1]
  mask = (index[:, 1:] < len(stream)).astype(np.float32)
  return PackedText(tokens=windows[:, :-1], targets=windows[:, 1:], mask=mask)


def is_validation(relpath: str, validation_fraction: float = 0.05) -> bool:
  """Stable split: md5 of the relative path, as a number in [0, 1), below the fraction."""
  digest = hashlib.md5(relpath.replace(os.sep, "/").encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction


def pysrc_files(root: str | None = None) -> list[str]:
  """Relative paths of the stdlib ``.py`` files, sorted (site-packages and test dirs skipped)."""
  root = root or sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
  return sorted(found)


@functools.lru_cache(maxsize=4)
def tokenizer_for(spec: str) -> ByteTokenizer | HFTokenizer:
  """``config.data.tokenizer``: ``"byte"`` -> ``ByteTokenizer``; ``"hf:DIR"`` -> ``hf_tokenizer.HFTokenizer``."""
  if spec == "byte":
    return ByteTokenizer()
  if isinstance(spec, str) and spec.startswith("hf:"):
    from kdlab.data import hf_tokenizer  # needs the tokenizers package
    return hf_tokenizer.load(spec)
  raise ValueError(f"tokenizer: unknown tokenizer {spec!r}; use 'byte' or 'hf:DIR' (a Hugging Face tokenizer "
                   f"folder)")


def pysrc(split: str = "train", *, seq_len: int = 256, max_bytes: int | None = 1 << 20,
          validation_fraction: float = 0.05, root: str | None = None, tokenizer: str = "byte") -> PackedText:
  """The stdlib's ``.py`` files as packed token sequences.

  Args:
    split: ``"train"`` or ``"validation"``.
    seq_len: tokens per sequence ``L``.
    max_bytes: stop adding files once this many bytes are read (the last file is cut there);
      None for the whole split (about 30 MB on CPython 3.12).
    validation_fraction: share of files (by path hash) in the validation split.
    root: the stdlib directory; default ``sysconfig.get_paths()["stdlib"]``.
    tokenizer: ``"byte"`` or ``"hf:DIR"`` (module doc); ``max_bytes`` counts bytes either way.

  Returns:
    ``PackedText`` with ``[N, seq_len]`` arrays; deterministic for a given interpreter.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split: expected 'train' or 'validation', got {split!r}")
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  root = root or sysconfig.get_paths()["stdlib"]
  want_validation = split == "validation"
  docs, total = [], 0
  for rel in pysrc_files(root):
    if is_validation(rel, validation_fraction) != want_validation:
      continue
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    data = data.replace(b"\0", b"")  # keep EOD unambiguous
    if max_bytes is not None:
      data = data[: max_bytes - total]
    docs.append(data)
    total += len(data)
    if max_bytes is not None and total >= max_bytes:
      break
  if not docs:
    raise ValueError(f"pysrc: no .py files for split {split!r} under {root}")
  tok = tokenizer_for(tokenizer)
  if isinstance(tok, ByteTokenizer):
    return pack([np.frombuffer(d, np.uint8).astype(np.int32) for d in docs], seq_len)
  if tok.eos_id is None:
    raise ValueError(f"tokenizer={tokenizer!r}: has no eos_token to end documents with; use a tokenizer with one")
  texts = [d.decode("utf-8", errors="replace") for d in docs]  # a file cut at max_bytes may end mid-character
  return pack(tok.encode_batch(texts, add_special_tokens=False), seq_len, eod=tok.eos_id)


# --- sources for the training loop ---------------------------------------------------------------

TEXT_SOURCES = ("pysrc",)


def is_text_source(name: str) -> bool:
  """Whether ``config.data.source = name`` is a text corpus (language modelling)."""
  return name in TEXT_SOURCES


@dataclasses.dataclass(frozen=True)
class TextSource:
  """A packed text split for the training loop.

  Attributes:
    name: source name as given in the config (``pysrc``).
    split: ``"train"`` or ``"validation"``.
    seq_len: tokens per sequence ``L``.
    vocab_size: the tokenizer's vocabulary size (256 for bytes; largest id + 1 for ``hf:DIR``).
    records: the ``PackedText`` (``[N, L]`` tokens, targets, mask).
  """
  name: str
  split: str
  seq_len: int
  vocab_size: int
  records: PackedText

  def __len__(self) -> int:
    return len(self.records)


@functools.lru_cache(maxsize=8)
def load_text(name: str, split: str, *, seq_len: int, max_bytes: int | None, tokenizer: str = "byte") -> TextSource:
  """Split ``split`` (``"train"`` or ``"validation"``) of text source ``name``, packed, tokenized by
  ``tokenizer`` (``config.data.tokenizer``: ``"byte"`` or ``"hf:DIR"``).

  Cached per process: the vmapped seeds of one run and a sweep's checks share one copy.
  """
  if name != "pysrc":
    raise ValueError(f"data.source: unknown text source {name!r}; choose one of {', '.join(TEXT_SOURCES)}")
  packed = pysrc(split, seq_len=seq_len, max_bytes=max_bytes, tokenizer=tokenizer)
  return TextSource(name, split, seq_len, tokenizer_for(tokenizer).vocab_size, packed)
