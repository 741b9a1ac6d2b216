"""Instruction and chat data from local files: ``config.data.source = "jsonl:PATH"`` or ``"parquet:PATH"``.

Files. ``PATH`` is one file, or a folder whose ``*.jsonl`` (``jsonl:``) / ``*.parquet`` (``parquet:``)
files, directly inside it, are read in sorted name order (other files there are ignored). Splits:
a folder holding a ``train/`` subfolder is read as ``train/`` and ``validation/`` (both needed, the
files directly inside each); anything else is split by a stable hash: a record goes to validation
when the md5 of its content (the JSON of its ``messages``, ``prompt``/``completion`` or ``text``,
keys sorted), read as a number in [0, 1), is below ``config.data.validation_fraction`` (default
0.05). Equal records land on the same side; with two records or more each side gets at least one
(the record of lowest hash moves to validation, or the highest to train). Records keep file order.

Records (a JSON object per line, or a parquet row; fields that are null count as absent), by the
first shape whose key is present:

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: roles ``system``, ``developer``, ``user``,
  ``assistant``, ``tool``; contents strings; at least one assistant message with text. Rendered
  with the tokenizer's chat template and tokenized as ``transformers``' ``apply_chat_template``
  does (:meth:`kdlab.data.hf_tokenizer.HFTokenizer.apply_chat_template`).
* ``{"prompt": str, "completion": str}`` (the completion not empty): with a chat template (see
  ``chat_template`` below) the chat ``[user: prompt, assistant: completion]``; without one
  ``[bos] prompt completion eos``, prompt and completion tokenized separately (no space added).
* ``{"text": str}`` (not empty): ``[bos] text eos``, every token counted.

``bos`` is the tokenizer's BOS where the tokenizer itself puts one before plain text (Llama,
Gemma; not Qwen, GPT-2 or bytes). Every example ends with the end of its last assistant turn: in a
chat, the template's end-of-turn token (a special token such as ``<|im_end|>`` or ``<|eot_id|>``
closing the last assistant span) when it has one, else the tokenizer's EOS appended after the
rendered chat; elsewhere the EOS (``ByteTokenizer.EOD`` for bytes). That token is counted.

Options (``config.data``):

* ``tokenizer``: ``"hf:DIR"`` (the student's) or ``"byte"`` (default; not for ``messages``).
* ``chat_template``: None (default: use the tokenizer's chat template for ``prompt``/``completion``
  when it has one), True (require one), False (plain concatenation), or a template name /
  Jinja source (for ``messages`` too). ``messages`` always need a template.
* ``loss_mask``: which target tokens count: ``"completion"`` (default: every assistant turn, the
  completion, all of a text), ``"last_turn"`` (the last assistant turn only), ``"all"`` (every
  token). A token counts when the token it predicts does (the mask sits on target positions).
* ``seq_len``: tokens per row. An example longer than ``seq_len`` is cut to its first ``seq_len``
  tokens (its end, EOS included, is lost); one whose prompt (the tokens before its first counted
  token) leaves no counted token within ``seq_len`` is an error naming it, unless ``drop_long`` is
  True: then every example longer than ``seq_len`` is left out instead (the counts are in the
  source's ``stats``).
* ``packing``: True (default) packs examples into rows (:mod:`kdlab.data.packing`), False gives
  each example its own padded row.
* ``teacher_tokenizer``: None (default), or ``"hf:DIR"`` (or ``"byte"``): the tokenizer of a teacher
  that reads text its own way (cross-tokenizer distillation, :mod:`kdlab.losses.cross_tokenizer`);
  needs ``packing=False``. ``teacher_seq_len``: the teacher's tokens per row (None: ``seq_len``).

Cross-tokenizer rows. With ``teacher_tokenizer`` every record is also encoded the teacher's way,
by the same rules with the teacher's tokenizer and chat template (``chat_template`` None, True or
False applies to both sides as it is; a template name or Jinja source is the student's: the teacher
uses its template of that name when it has one, else its default), and cut or refused against
``teacher_seq_len`` as the student's side is against ``seq_len`` (``drop_long`` leaves out an
example too long on either side). Each row then also holds ``teacher_tokens``, ``teacher_targets``
int32 ``[Lt]``, ``teacher_token_mask`` float32 ``[Lt]`` (the teacher's loss mask, the same
``loss_mask`` rule), and the chunks of :mod:`kdlab.data.alignment`: ``student_chunks`` int32 ``[L]``
and ``teacher_chunks`` int32 ``[Lt]``, on target positions, -1 outside chunks. Chunks cover the
content both renderings share: each assistant message's content (a chat), the completion, or the
whole text, paired turn by turn (:func:`kdlab.data.alignment.pair_spans`: a template that trims the
content pairs the trimmed text), and only tokens counted by the loss mask on both sides.

Bad records are one-line :class:`UserError` s naming ``FILE:LINE`` (jsonl, lines from 1) or
``FILE: row N`` (parquet, rows from 0, as pyarrow counts them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kdlab.data import alignment, packing, text
from kdlab.data import chat_template as templating
from kdlab.errors import UserError

KINDS = {"jsonl:": ".jsonl", "parquet:": ".parquet"}
ROLES = ("system", "developer", "user", "assistant", "tool")
LOSS_MASKS = ("completion", "last_turn", "all")
SHAPES = "'messages', 'prompt' and 'completion', or 'text'"


def is_instruct_source(source: Any) -> bool:
  """Whether ``config.data.source`` names local instruction data (``jsonl:PATH`` / ``parquet:PATH``)."""
  return isinstance(source, str) and source.startswith(tuple(KINDS))


@dataclasses.dataclass(frozen=True)
class Record:
  """One record, as read: exactly one of ``messages``, ``prompt``/``completion``, ``text`` is set.

  Attributes:
    where: ``FILE:LINE`` or ``FILE: row N``, for messages.
    messages: the chat, ``({"role": str, "content": str, ...}, ...)``.
    prompt, completion: the two texts of a prompt/completion record.
    text: a plain text record.
  """
  where: str
  messages: tuple[dict, ...] | None = None
  prompt: str | None = None
  completion: str | None = None
  text: str | None = None

  @property
  def kind(self) -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"``."""
    if self.messages is not None:
      return "messages"
    return "text" if self.text is not None else "prompt_completion"

  def content(self) -> dict[str, Any]:
    """The record's content (no location): what the split hashes."""
    if self.messages is not None:
      return {"messages": list(self.messages)}
    if self.text is not None:
      return {"text": self.text}
    return {"prompt": self.prompt, "completion": self.completion}


@dataclasses.dataclass(frozen=True)
class Options:
  """The ``config.data`` fields of an instruction source, checked (module doc)."""
  tokenizer: str = "byte"
  seq_len: int = 512
  loss_mask: str = "completion"
  chat_template: bool | str | None = None
  packing: bool = True
  drop_long: bool = False
  validation_fraction: float = 0.05
  teacher_tokenizer: str | None = None
  teacher_seq_len: int | None = None


def options(data_cfg: Any, seq_len: int) -> Options:
  """The instruction-data fields of ``config.data`` (defaults for those it lacks), each checked."""
  get = data_cfg.get
  tokenizer = get("tokenizer") or "byte"
  loss_mask = get("loss_mask", "completion")
  if loss_mask not in LOSS_MASKS:
    raise UserError(f"config.data.loss_mask={loss_mask!r}: unknown; use one of {', '.join(map(repr, LOSS_MASKS))}")
  template = get("chat_template", None)
  if not (template is None or isinstance(template, bool) or (isinstance(template, str) and template)):
    raise UserError(f"config.data.chat_template={template!r}: use None (the tokenizer's template when it has one), "
                    f"True, False or a template name")
  for key in ("packing", "drop_long"):
    if not isinstance(get(key, False), bool):
      raise UserError(f"config.data.{key}={get(key)!r}: must be True or False")
  fraction = get("validation_fraction", 0.05)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
    raise UserError(f"config.data.validation_fraction={fraction!r}: must be a number in (0, 1), e.g. 0.05")
  teacher_tokenizer, teacher_seq_len = get("teacher_tokenizer", None), get("teacher_seq_len", None)
  if teacher_tokenizer is not None:
    spec = teacher_tokenizer
    if not (isinstance(spec, str) and (spec == "byte" or spec.startswith("hf:"))):
      raise UserError(f"config.data.teacher_tokenizer={teacher_tokenizer!r}: use 'hf:DIR' (the teacher's Hugging Face "
                      f"tokenizer folder), 'byte' or None")
    if get("packing", True) is not False:
      raise UserError(f"config.data.packing={get('packing', True)!r}: cross-tokenizer rows "
                      f"(config.data.teacher_tokenizer) hold one example each; set config.data.packing=False")
  if teacher_seq_len is not None and (isinstance(teacher_seq_len, bool) or not isinstance(teacher_seq_len, int)
                                      or teacher_seq_len < 1):
    raise UserError(f"config.data.teacher_seq_len={teacher_seq_len!r}: must be an int >= 1 or None (seq_len)")
  return Options(tokenizer=tokenizer, seq_len=seq_len, loss_mask=loss_mask, chat_template=template,
                 packing=get("packing", True), drop_long=get("drop_long", False), validation_fraction=float(fraction),
                 teacher_tokenizer=teacher_tokenizer, teacher_seq_len=teacher_seq_len)


# --- files and records ---------------------------------------------------------------------------

def _files_in(folder: pathlib.Path, ext: str, source: str) -> list[pathlib.Path]:
  found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ext))
  if not found:
    raise UserError(f"config.data.source={source!r}: no {ext} files in {folder}; point at a {ext} file or a folder "
                    f"of them")
  return found


def source_files(source: str) -> dict[str, list[pathlib.Path]]:
  """The files of ``source`` by split: ``{"train": [...], "validation": [...]}`` for a folder with
  ``train/`` and ``validation/``, else ``{"all": [...]}`` (split by hash)."""
  prefix = next(p for p in KINDS if source.startswith(p))
  ext, path = KINDS[prefix], pathlib.Path(source[len(prefix):])
  if not source[len(prefix):]:
    raise UserError(f"config.data.source={source!r}: no path; use {prefix}FILE or {prefix}FOLDER")
  if path.is_file():
    return {"all": [path]}
  if not path.is_dir():
    raise UserError(f"config.data.source={source!r}: {path} does not exist; point at a {ext} file or a folder of them")
  if (path / "train").is_dir():
    if not (path / "validation").is_dir():
      raise UserError(f"config.data.source={source!r}: {path} has train/ but no validation/; add validation/ or "
                      f"point at {path / 'train'} to split it by hash")
    return {"train": _files_in(path / "train", ext, source), "validation": _files_in(path / "validation", ext, source)}
  return {"all": _files_in(path, ext, source)}


def _string(record: Mapping, key: str, where: str) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}; fix the record")
  return value


def parse_record(record: Any, where: str) -> Record:
  """A raw JSON object / parquet row -> :class:`Record` (module doc); bad records name ``where``."""
  if not isinstance(record, Mapping):
    raise UserError(f"{where}: expected a JSON object with {SHAPES}, got {type(record).__name__}; fix the record")
  present = {k for k, v in record.items() if v is not None}
  if "messages" in present:
    messages = record["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
      raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects; fix the record")
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise UserError(f"{where}: messages[{i}] must have 'role' and 'content' strings, got {repr(m)[:80]}; fix the "
                        f"record")
      if m["role"] not in ROLES:
        raise UserError(f"{where}: messages[{i}] has the unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
      out.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
      raise UserError(f"{where}: empty content: no assistant message with text, nothing to learn; give an assistant "
                      f"reply or drop the record")
    return Record(where, messages=tuple(out))
  if "prompt" in present or "completion" in present:
    for key in ("prompt", "completion"):
      if key not in present:
        raise UserError(f"{where}: has 'prompt' or 'completion' but no {key!r}; give both")
    prompt, completion = _string(record, "prompt", where), _string(record, "completion", where)
    if not completion:
      raise UserError(f"{where}: empty content: the completion is empty; give one or drop the record")
    return Record(where, prompt=prompt, completion=completion)
  if "text" in present:
    value = _string(record, "text", where)
    if not value:
      raise UserError(f"{where}: empty content: the text is empty; drop the record")
    return Record(where, text=value)
  raise UserError(f"{where}: a record needs {SHAPES}; got keys {sorted(record)[:8]}")


def _jsonl_records(path: pathlib.Path) -> Iterator[Record]:
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      where = f"{path}:{line_no}"
      if not line.strip():
        continue
      try:
        raw = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
      except ValueError as e:
        raise UserError(f"{where}: malformed JSON ({e}); fix the line") from None
      yield parse_record(raw, where)


def _parquet_records(path: pathlib.Path) -> Iterator[Record]:
  try:
    import pyarrow.parquet as pq  # only parquet sources need it
  except ImportError:
    raise UserError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
  try:
    rows = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for unreadable files
    raise UserError(f"{path}: not a readable parquet file ({' '.join(str(e).split())}); restore it") from None
  row = 0
  for batch in rows.iter_batches(batch_size=1024):
    for raw in batch.to_pylist():
      yield parse_record(raw, f"{path}: row {row}")
      row += 1


def read_records(path: pathlib.Path, kind: str) -> list[Record]:
  """The records of one file, in order; ``kind`` is ``".jsonl"`` or ``".parquet"``."""
  return list(_jsonl_records(path) if kind == ".jsonl" else _parquet_records(path))


def _hash01(record: Record) -> float:
  content = json.dumps(record.content(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return int.from_bytes(hashlib.md5(content.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_records(records: Sequence[Record], validation_fraction: float) -> tuple[list[Record], list[Record]]:
  """``(train, validation)`` by content hash (module doc); both non-empty when there are two records or more."""
  hashes = [_hash01(r) for r in records]
  is_val = [h < validation_fraction for h in hashes]
  if len(records) >= 2 and not any(is_val):
    is_val[int(np.argmin(hashes))] = True
  if len(records) >= 2 and all(is_val):
    is_val[int(np.argmax(hashes))] = False
  return ([r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v])


# --- tokens and loss masks -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Encoder:
  """Turns records into ``(tokens int32 [n], counted bool [n])``: ``counted[t]`` says token ``t`` is a
  loss target (predicted from the tokens before it)."""
  tok: Any  # text.ByteTokenizer or hf_tokenizer.HFTokenizer
  field: str  # "config.data.tokenizer=..." for errors
  loss_mask: str
  chat_template: bool | str | None

  @functools.cached_property
  def is_hf(self) -> bool:
    return not isinstance(self.tok, text.ByteTokenizer)

  @functools.cached_property
  def eos(self) -> int:
    if not self.is_hf:
      return text.ByteTokenizer.EOD
    if self.tok.eos_id is None:
      raise UserError(f"{self.field}: the tokenizer has no eos_token to end examples with; use a tokenizer with one")
    return int(self.tok.eos_id)

  @functools.cached_property
  def bos(self) -> list[int]:
    """``[bos]`` when the tokenizer puts a BOS before plain text itself, else ``[]``."""
    if not self.is_hf or self.tok.bos_id is None:
      return []
    ids = self.tok.encode("a", add_special_tokens=True)
    return [int(ids[0])] if len(ids) and int(ids[0]) == self.tok.bos_id else []

  @functools.cached_property
  def special_ids(self) -> frozenset[int]:
    return frozenset(i for i, t in self.tok.backend.get_added_tokens_decoder().items() if t.special)

  @functools.cached_property
  def wraps(self) -> bool:
    """Whether prompt/completion records become chats (else they are concatenated)."""
    has = self.is_hf and bool(self.tok.templates)
    if self.chat_template is False or (self.chat_template is None and not has):
      return False
    if not has:
      raise UserError(f"{self.field}: the tokenizer has no chat template, which config.data.chat_template="
                      f"{self.chat_template!r} asks for; use a chat model's tokenizer (hf:DIR with a chat_template) "
                      f"or config.data.chat_template=False")
    name = self.chat_template
    if isinstance(name, str) and name not in self.tok.templates and "{" not in name:
      raise UserError(f"config.data.chat_template={name!r}: {self.field} has no such template; use one of "
                      f"{sorted(self.tok.templates)}, None (its default) or Jinja source")
    return True

  def _plain(self, pieces: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each piece -> (int32 ``[n]`` ids, int64 ``[n, 2]`` character offsets in the piece), no special tokens."""
    if self.is_hf:
      out = []
      for p in pieces:
        enc = self.tok.backend.encode(p, add_special_tokens=False)
        out.append((np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)))
      return out
    return [(self.tok.encode(p), _byte_offsets(p)) for p in pieces]

  def _chat(self, messages: list[dict], where: str, with_spans: bool) -> Encoded:
    if not self.is_hf or not self.tok.templates or self.chat_template is False:
      why = "is the byte tokenizer" if not self.is_hf else (
          "has no chat template" if not self.tok.templates else "is used without one (config.data.chat_template=False)")
      key = self.field.split("=", 1)[0]
      raise UserError(f"{where}: a messages record needs a chat template but {self.field} {why}; use a chat model's "
                      f"tokenizer ({key}='hf:DIR' with a chat_template) or prompt/completion records")
    name = self.chat_template if isinstance(self.chat_template, str) else None
    try:
      enc = self.tok.apply_chat_template(messages, chat_template=name)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    assistant = enc.assistant_mask
    if not assistant.any():
      raise UserError(f"{where}: the chat template marks no assistant token; use a template that renders the "
                      f"assistant's messages (or mark them with {{% generation %}} blocks)")
    counted = assistant.copy()
    if self.loss_mask == "last_turn":  # the last run of assistant tokens
      last = int(np.flatnonzero(assistant)[-1])
      start = last
      while start > 0 and assistant[start - 1]:
        start -= 1
      counted[:] = False
      counted[start:last + 1] = True
    ids = enc.ids
    eos = int(ids[np.flatnonzero(assistant)[-1]]) not in self.special_ids  # no end-of-turn token: end with EOS
    if eos:
      ids, counted = np.append(ids, np.int32(self.eos)), np.append(counted, True)
    if self.loss_mask == "all":
      counted = np.ones(len(ids), bool)
    if not with_spans:
      return Encoded(ids.astype(np.int32), counted)
    # The chat once more for the assistant contents' spans, and its tokens' offsets (the same ids).
    _, spans, _ = templating.render(self.tok.get_template(name), messages, special_tokens=self.tok.special_tokens)
    offsets = np.asarray(self.tok.backend.encode(enc.text, add_special_tokens=False).offsets, np.int64).reshape(-1, 2)
    if eos:
      offsets = np.concatenate([offsets, [[len(enc.text), len(enc.text)]]])
    return Encoded(ids.astype(np.int32), counted, enc.text, offsets, _message_spans(enc.text, spans, messages))

  def _encode(self, record: Record, with_spans: bool) -> Encoded:
    if record.messages is not None:
      return self._chat(list(record.messages), record.where, with_spans)
    if record.text is None and self.wraps:
      return self._chat([{"role": "user", "content": record.prompt},
                         {"role": "assistant", "content": record.completion}], record.where, with_spans)
    pieces = [record.text] if record.text is not None else [record.prompt, record.completion]
    encoded = self._plain(pieces)
    text_ = "".join(pieces)
    head = len(self.bos) + (len(encoded[0][0]) if record.text is None else 0)
    ids = np.concatenate([np.asarray(self.bos, np.int32), *(i for i, _ in encoded), [self.eos]]).astype(np.int32)
    counted = np.ones(len(ids), bool)
    if self.loss_mask != "all" or record.text is not None:
      counted[:head] = False
    if not with_spans:
      return Encoded(ids, counted)
    offsets, base = [np.zeros((len(self.bos), 2), np.int64)], 0
    for piece, (_, off) in zip(pieces, encoded):
      offsets.append(off + base)
      base += len(piece)
    offsets.append(np.full((1, 2), len(text_), np.int64))
    return Encoded(ids, counted, text_, np.concatenate(offsets), ((len(pieces[0]) if record.text is None else 0,
                                                                   len(text_)),))

  def encode(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [n], counted bool [n])`` of ``record`` (module doc)."""
    encoded = self._encode(record, with_spans=False)
    return encoded.ids, encoded.counted

  def encode_spans(self, record: Record) -> Encoded:
    """``record`` encoded with its text, its tokens' character offsets and its content spans (for
    cross-tokenizer alignment, :mod:`kdlab.data.alignment`)."""
    return self._encode(record, with_spans=True)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One encoded record.

  Attributes:
    ids: int32 ``[n]`` token ids.
    counted: bool ``[n]``: token ``t`` is a loss target.
    text: the text the tokens cover (the rendered chat, ``prompt + completion``, the text); with spans only.
    offsets: int64 ``[n, 2]`` each token's characters ``[start, end)`` in ``text`` (empty for a BOS or
      an appended EOS); with spans only.
    spans: the content pieces' ``(start, end)`` in ``text``, one per assistant message (None where the
      template does not render its content), or the completion's, or the whole text's.
  """
  ids: np.ndarray
  counted: np.ndarray
  text: str = ""
  offsets: np.ndarray | None = None
  spans: tuple[tuple[int, int] | None, ...] = ()


def _byte_offsets(piece: str) -> np.ndarray:
  """int64 ``[n_bytes, 2]``: the character each UTF-8 byte of ``piece`` belongs to, as ``[i, i + 1)``."""
  sizes = [len(c.encode("utf-8")) for c in piece]
  starts = np.repeat(np.arange(len(piece), dtype=np.int64), sizes)
  return np.stack([starts, starts + 1], axis=1).reshape(-1, 2)


def _message_spans(text_: str, spans: Sequence[tuple[int, int]], messages: Sequence[Mapping]
                   ) -> tuple[tuple[int, int] | None, ...]:
  """Each assistant message's content in the rendered chat ``text_``: the first place, at or after the
  previous message's, inside one of the template's assistant ``spans`` (content spans, or generation
  blocks holding more than the content), that holds the content, else its stripped text; None when
  neither is there."""
  out: list[tuple[int, int] | None] = []
  cursor = 0
  for message in messages:
    if message["role"] != "assistant":
      continue
    found = None
    for want in dict.fromkeys((message["content"], message["content"].strip())):
      for start, end in spans if want else ():
        at = text_.find(want, max(start, cursor), end)
        if at >= 0:
          found = (at, at + len(want))
          break
      if found:
        break
    out.append(found)
    cursor = found[1] if found else cursor
  return tuple(out)


def fit(ids: np.ndarray, counted: np.ndarray, record: Record, seq_len: int, drop_long: bool,
        field: str = "config.data.seq_len") -> tuple[np.ndarray, np.ndarray] | None:
  """An example's ``(tokens [n], mask [n])`` within ``seq_len`` (mask on target positions: ``mask[t] =
  counted[t + 1]``, 0 at the end); None when ``drop_long`` leaves it out. Long examples are cut.
  ``field`` names the length in errors (``config.data.teacher_seq_len`` for the teacher's side)."""
  if len(ids) > seq_len:
    if drop_long:
      return None
    prompt = int(np.argmax(counted)) if counted.any() else len(ids)
    if prompt >= seq_len:
      whose = "the teacher's prompt" if "teacher" in field else "the prompt"
      raise UserError(f"{record.where}: {whose} is {prompt} tokens (the example {len(ids)}), which leaves no "
                      f"counted token within {field}={seq_len}; raise {field} above {prompt} "
                      f"or drop such records with config.data.drop_long=True")
    ids, counted = ids[:seq_len], counted[:seq_len]
  mask = np.zeros(len(ids), np.float32)
  mask[:-1] = counted[1:]
  return ids, mask


# --- the sources ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InstructSource(text.TextSource):
  """A packed split of instruction data: a :class:`kdlab.data.text.TextSource` whose ``records`` are
  :class:`kdlab.data.packing.PackedRows` (segment ids and positions included).

  Attributes (besides ``name``, ``split``, ``seq_len``, ``vocab_size``, ``records``):
    examples: the split's records in example order: example ``e`` (``records.example_row[e]``, ...)
      came from ``examples[e]`` (its text, for a teacher that tokenizes its own way).
    stats: ``{"train": {...}, "validation": {...}}``, the same for both splits: for each its ``records``
      (read), ``examples`` (kept), ``dropped`` (by ``drop_long``), ``truncated`` (cut at ``seq_len``),
      ``rows``, ``tokens`` (in the examples) and ``counted`` (loss targets); with a teacher
      tokenization also ``teacher_truncated`` (cut at ``teacher_seq_len``), ``teacher_tokens``,
      ``teacher_counted`` and ``chunks`` (aligned chunks kept).
    teacher_seq_len, teacher_vocab_size: ``Lt`` and the teacher tokenizer's vocabulary size when the
      rows carry the teacher's tokenization (``records.extra``, module doc), else None.
  """
  examples: tuple[Record, ...] = ()
  stats: dict = dataclasses.field(default_factory=dict, compare=False)
  teacher_seq_len: int | None = None
  teacher_vocab_size: int | None = None


def _signature(files: Mapping[str, list[pathlib.Path]]) -> tuple:
  """What the cache of :func:`_load` keys on besides the options: the files, their sizes and times."""
  return tuple((split, str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
               for split, paths in files.items() for p in paths)


def load(source: str, opts: Options) -> tuple[InstructSource, InstructSource]:
  """``(train, validation)`` of ``config.data.source = source`` under ``opts`` (module doc).

  Cached per process on the files' names, sizes and modification times and the options.
  """
  files = source_files(source)
  return _load(source, opts, _signature(files))


def _tokenizer(spec: str, key: str) -> Any:
  try:
    return text.tokenizer_for(spec)
  except ValueError as e:
    raise UserError(f"config.data.{key}{str(e).removeprefix('tokenizer')}") from None


def _teacher_template(chat_template: bool | str | None, tok: Any) -> bool | str | None:
  """The teacher's ``chat_template`` setting (module doc): a name it has, else its default."""
  if not isinstance(chat_template, str):
    return chat_template
  return chat_template if chat_template in getattr(tok, "templates", {}) else True


def _example(record: Record, encoder: Encoder, opts: Options, t_encoder: Encoder | None) -> dict | None:
  """One record's row arrays (before packing): ``tokens``, ``mask`` and ``cut``; with a teacher also
  ``teacher_tokens``, ``teacher_mask``, ``teacher_cut`` and the chunk ids on target positions
  ``student_chunks``, ``teacher_chunks``. None when ``drop_long`` leaves it out."""
  if t_encoder is None:
    ids, counted = encoder.encode(record)
    fitted = fit(ids, counted, record, opts.seq_len, opts.drop_long)
    return None if fitted is None else {"tokens": fitted[0], "mask": fitted[1], "cut": len(ids) > opts.seq_len}
  t_len = opts.teacher_seq_len or opts.seq_len
  s, t = encoder.encode_spans(record), t_encoder.encode_spans(record)
  s_fit = fit(s.ids, s.counted, record, opts.seq_len, opts.drop_long)
  t_fit = fit(t.ids, t.counted, record, t_len, opts.drop_long, field="config.data.teacher_seq_len")
  if s_fit is None or t_fit is None:
    return None
  s_spans, t_spans = alignment.pair_spans(s.text, s.spans, t.text, t.spans)
  s_chunk, t_chunk = alignment.chunk_ids(s.offsets, s_spans, t.offsets, t_spans)
  s_chunks, t_chunks = alignment.chunk_targets(s_chunk, s_fit[1], t_chunk, t_fit[1])
  return {"tokens": s_fit[0], "mask": s_fit[1], "cut": len(s.ids) > opts.seq_len, "teacher_tokens": t_fit[0],
          "teacher_mask": t_fit[1], "teacher_cut": len(t.ids) > t_len, "student_chunks": s_chunks,
          "teacher_chunks": t_chunks}


def _rows(examples: list[dict], opts: Options, pad: int, t_pad: int | None) -> packing.PackedRows:
  """The examples packed (module doc); with a teacher, its arrays in ``extra`` (one example per row)."""
  if t_pad is None:
    return packing.pack([e["tokens"] for e in examples], [e["mask"] for e in examples], opts.seq_len, pad_id=pad,
                        packing=opts.packing)
  rows = packing.pack([e["tokens"] for e in examples], [e["mask"] for e in examples], opts.seq_len, pad_id=pad,
                      packing=False, extra={"student_chunks": ([e["student_chunks"] for e in examples], -1)})
  t_rows = packing.pack([e["teacher_tokens"] for e in examples], [e["teacher_mask"] for e in examples],
                        opts.teacher_seq_len or opts.seq_len, pad_id=t_pad, packing=False,
                        extra={"teacher_chunks": ([e["teacher_chunks"] for e in examples], -1)})
  extra = {**rows.extra, "teacher_tokens": t_rows.tokens, "teacher_targets": t_rows.targets,
           "teacher_token_mask": t_rows.mask, "teacher_chunks": t_rows.extra["teacher_chunks"]}
  return dataclasses.replace(rows, extra=extra)


@functools.lru_cache(maxsize=8)
def _load(source: str, opts: Options, signature: tuple) -> tuple[InstructSource, InstructSource]:
  files = source_files(source)
  ext = KINDS[next(p for p in KINDS if source.startswith(p))]
  tok = _tokenizer(opts.tokenizer, "tokenizer")
  encoder = Encoder(tok, f"config.data.tokenizer={opts.tokenizer!r}", opts.loss_mask, opts.chat_template)
  t_tok = t_encoder = t_pad = None
  if opts.teacher_tokenizer is not None:
    t_tok = _tokenizer(opts.teacher_tokenizer, "teacher_tokenizer")
    t_encoder = Encoder(t_tok, f"config.data.teacher_tokenizer={opts.teacher_tokenizer!r}", opts.loss_mask,
                        _teacher_template(opts.chat_template, t_tok))
    t_pad = t_tok.pad_id if t_encoder.is_hf and t_tok.pad_id is not None else t_encoder.eos
  if "all" in files:
    records = [r for path in files["all"] for r in read_records(path, ext)]
    if len(records) < 2:
      raise UserError(f"config.data.source={source!r}: {len(records)} record(s); a train/validation split needs at "
                      f"least 2 (or give train/ and validation/ folders)")
    splits = dict(zip(("train", "validation"), split_records(records, opts.validation_fraction)))
  else:
    splits = {split: [r for path in files[split] for r in read_records(path, ext)] for split in files}
    records = splits["train"] + splits["validation"]
  for enc in (encoder, t_encoder):  # a template asked for but missing fails before any record is encoded
    if enc is not None:
      enc.wraps  # noqa: B018
  pad = tok.pad_id if encoder.is_hf and tok.pad_id is not None else encoder.eos  # padding is never a target
  # Encoded in file order, so the first bad record is named.
  fitted = {id(record): _example(record, encoder, opts, t_encoder) for record in records}
  out, stats = [], {}
  for split in ("train", "validation"):
    kept = [r for r in splits[split] if fitted[id(r)] is not None]
    examples = [fitted[id(r)] for r in kept]
    if not kept:
      why = " (config.data.drop_long=True left out every one)" if splits[split] else ""
      lengths = "config.data.seq_len" + (" (or teacher_seq_len)" if t_pad is not None else "")
      raise UserError(f"config.data.source={source!r}: the {split} split has no examples{why}; add records or raise "
                      f"{lengths}")
    rows = _rows(examples, opts, int(pad), None if t_pad is None else int(t_pad))
    stats[split] = {"records": len(splits[split]), "examples": len(kept), "dropped": len(splits[split]) - len(kept),
                    "truncated": sum(e["cut"] for e in examples), "rows": len(rows),
                    "tokens": int(sum(len(e["tokens"]) for e in examples)), "counted": rows.num_tokens}
    if t_pad is not None:
      stats[split] |= {"teacher_truncated": sum(e["teacher_cut"] for e in examples),
                       "teacher_tokens": int(sum(len(e["teacher_tokens"]) for e in examples)),
                       "teacher_counted": int(rows.extra["teacher_token_mask"].sum()),
                       "chunks": int(sum(e["student_chunks"].max(initial=-1) + 1 for e in examples))}
    out.append((split, rows, tuple(kept)))
  t_len = (opts.teacher_seq_len or opts.seq_len) if t_tok is not None else None
  train, val = (InstructSource(source, split, opts.seq_len, tok.vocab_size, rows, kept, stats, t_len,
                               None if t_tok is None else t_tok.vocab_size)
                for split, rows, kept in out)
  return train, val
