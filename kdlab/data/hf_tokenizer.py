"""Hugging Face tokenizers without ``transformers``: ``tokenizer.json``, special tokens, chat templates.

``HFTokenizer.from_dir(DIR)`` reads a folder written by ``save_pretrained`` (or downloaded from the
Hub), as ``transformers`` 5 loads it:

* ``tokenizer.json`` (required): the ``tokenizers`` pipeline; truncation and padding are switched
  off (kdlab encodes whole documents).
* ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``, ``unk_token``,
  ``pad_token``, ...; strings or AddedToken dicts), ``added_tokens_decoder``, ``add_bos_token`` /
  ``add_eos_token`` (when either is given, the post-processor becomes ``[bos] $A [eos]`` as the
  flags say), ``split_special_tokens``, ``chat_template`` (a string, or a list of
  ``{"name", "template"}``). Special and added tokens missing from ``tokenizer.json`` are added.
* ``special_tokens_map.json``: read only when the config has no ``added_tokens_decoder`` (the
  legacy layout); its entries override the config's.
* ``chat_template.jinja`` and ``additional_chat_templates/NAME.jinja``: when present they replace
  the config's templates (``chat_template.jinja`` is ``default``).

``apply_chat_template`` renders with :mod:`kdlab.data.chat_template` and tokenizes the text with
``add_special_tokens=False``, as ``transformers`` does. Its ``assistant_mask`` marks:

* with ``{% generation %}`` blocks in the template: every token overlapping a block's output (what
  ``transformers`` returns as ``assistant_masks``);
* otherwise: every token overlapping an assistant message's rendered content, plus the end-of-turn
  token: the token that starts right where the content ends, when it is a special token
  (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, an ``eos_token``): what the model generates
  in that turn, up to the token it stops at. The role header and the newlines around the turn are
  left out. (TRL's assistant-only loss uses templates with generation blocks; its Qwen2.5 one wraps
  the newline after the role header, the content, ``<|im_end|>`` and the newline after it, so its
  masks hold those two newlines too.)

Vocabulary sizes: ``vocab_size`` is the largest token id plus one (added tokens included), the rows
an embedding needs; models often pad it (Qwen2.5: 151,665 tokens, 151,936 or 152,064 rows).
:func:`align_vocab` checks that teacher and student share a tokenizer (:attr:`HFTokenizer.content_hash`,
a hash of the model's vocabulary and merges and the added tokens' ids, not of the file bytes) and
gives the number of logit columns both can be sliced to.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
import tokenizers
from tokenizers import processors

from kdlab.data import chat_template as templating
from kdlab.errors import UserError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CROSS_TOKENIZER = ("to distil across tokenizers set config.data.teacher_tokenizer='hf:<the teacher's tokenizer "
                   "directory>' and use the uld / aligned_kd terms (docs/llm_workflow.md)")


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
  """A tokenized chat.

  Attributes:
    ids: int32 ``[n]`` token ids of the rendered chat (no special tokens added around it).
    assistant_mask: bool ``[n]``, True on the assistant turns' tokens (module doc says which).
    text: the rendered chat, ``n`` tokens long.
  """
  ids: np.ndarray
  assistant_mask: np.ndarray
  text: str


def _token_content(value: Any, where: str) -> str | None:
  """A special token given as a string, an AddedToken dict or None."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise UserError(f"{where}: expected a token string or an AddedToken dict with 'content', got {repr(value)[:80]}; "
                  f"fix the tokenizer files")


def _added_token(value: Any, where: str) -> tokenizers.AddedToken:
  if not isinstance(value, Mapping):
    raise UserError(f"{where}: expected an AddedToken dict, got {repr(value)[:80]}; fix the tokenizer files")
  fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
  return tokenizers.AddedToken(_token_content(value, where), **fields)


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}); restore the file") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object; restore the file")
  return data


def _add_missing_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any], where: str) -> dict[str, str]:
  """Adds the config's added and special tokens that ``tokenizer.json`` lacks; returns ``{"eos_token": ...}``."""
  decoder = config.get("added_tokens_decoder") or {}
  if not (isinstance(decoder, Mapping) and all(str(i).isdigit() for i in decoder)):
    raise UserError(f"{where}: added_tokens_decoder must map token ids to AddedToken dicts; fix the file")
  missing = []
  for i, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
    token = _added_token(value, f"{where}: added_tokens_decoder[{i}]")
    if backend.token_to_id(token.content) is None:
      missing.append(token)
  if missing:
    backend.add_tokens(missing)
  special = {}
  for key in SPECIAL_TOKEN_NAMES:
    content = _token_content(config.get(key), f"{where}: {key}")
    if content is not None:
      special[key] = content
      if backend.token_to_id(content) is None:
        backend.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
  return special


def _templates(folder: pathlib.Path, config: Mapping[str, Any]) -> dict[str, templating.Template]:
  """Named chat templates: the ``.jinja`` files when present, else ``config["chat_template"]``."""
  where = f"{folder / 'tokenizer_config.json'}: chat_template"
  sources: dict[str, tuple[str, str]] = {}  # name -> (source, where it came from)
  default, extra = folder / "chat_template.jinja", folder / "additional_chat_templates"
  if default.is_file():
    sources["default"] = default.read_text(encoding="utf-8"), str(default)
  if extra.is_dir():
    for path in sorted(extra.glob("*.jinja")):
      sources[path.stem] = path.read_text(encoding="utf-8"), str(path)
  if not sources:
    value = config.get("chat_template")
    if isinstance(value, str):
      sources["default"] = value, where
    elif isinstance(value, list):
      for i, item in enumerate(value):
        if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)):
          raise UserError(f"{where}[{i}]: expected {{'name': str, 'template': str}}; fix tokenizer_config.json")
        sources[item["name"]] = item["template"], f"{where}[{i}]"
    elif value is not None:
      raise UserError(f"{where}: expected a string or a list of named templates, got {type(value).__name__}; "
                      f"fix tokenizer_config.json")
  return {name: templating.compile_template(src, origin) for name, (src, origin) in sources.items()}


class HFTokenizer:
  """A Hugging Face fast tokenizer (``tokenizers``) with its special tokens and chat templates.

  Build with :meth:`from_dir`. ``encode``/``decode`` behave as ``transformers``' (``decode`` does no
  ``clean_up_tokenization_spaces``, which ``transformers`` 5 skips for BPE too).
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str],
               templates: Mapping[str, templating.Template], name: str = "tokenizer") -> None:
    self.backend = backend
    self.special_tokens = dict(special_tokens)  # {"eos_token": "<|im_end|>", ...}, only those set
    self.templates = dict(templates)
    self.name = name
    vocab = backend.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads the tokenizer folder ``path`` (module doc lists the files read)."""
    folder = pathlib.Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
      raise UserError(f"{folder}: no tokenizer.json there; point at a Hugging Face tokenizer folder "
                      f"(what save_pretrained writes)")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
      raise UserError(f"{tokenizer_file}: not a tokenizers file ({' '.join(str(e).split())}); restore it") from None
    backend.no_truncation()
    backend.no_padding()
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    if "added_tokens_decoder" not in config:  # the legacy layout: special_tokens_map.json has the last word
      config = {**config, **_read_json(folder / "special_tokens_map.json")}
    special = _add_missing_tokens(backend, config, str(config_file))
    if "add_bos_token" in config or "add_eos_token" in config:
      _set_bos_eos(backend, special.get("bos_token") if config.get("add_bos_token") else None,
                   special.get("eos_token") if config.get("add_eos_token") else None)
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return cls(backend, special_tokens=special, templates=_templates(folder, config), name=str(folder))

  # --- tokens -------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Largest token id + 1, added tokens included (``len(tokenizer)`` in ``transformers``)."""
    return self._vocab_size

  def token_id(self, key: str) -> int | None:
    """The id of special token ``key`` (``"eos_token"``, ...), or None when the tokenizer has none."""
    content = self.special_tokens.get(key)
    return None if content is None else self.backend.token_to_id(content)

  @property
  def eos_id(self) -> int | None:
    return self.token_id("eos_token")

  @property
  def bos_id(self) -> int | None:
    return self.token_id("bos_token")

  @property
  def pad_id(self) -> int | None:
    return self.token_id("pad_token")

  def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """``str`` -> int32 ``[n]`` ids; ``add_special_tokens`` applies the post-processor (e.g. a BOS)."""
    if not isinstance(text, str):
      raise UserError(f"text: expected a string, got {type(text).__name__}; pass text")
    return np.asarray(self.backend.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

  def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
    """:meth:`encode` of each text (in parallel threads)."""
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    """Token ids -> text; ``skip_special_tokens`` leaves out special tokens (``<|im_end|>``, ...)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise UserError(f"ids: must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]; "
                      f"decode ids of this tokenizer")
    return self.backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

  @functools.cached_property
  def content_hash(self) -> str:
    """sha256 of the vocabulary, the merges (BPE) and the added tokens' ids: equal for the same tokenizer."""
    model = json.loads(self.backend.to_str())["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    added = sorted((i, t.content) for i, t in self.backend.get_added_tokens_decoder().items())
    identity = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "added": added}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

  # --- chats --------------------------------------------------------------------------------------

  def get_template(self, name: str | None = None, *, tools: Any = None) -> templating.Template:
    """The template ``name`` (or Jinja source); by default ``tool_use`` when tools are given and present,
    else ``default``, as ``transformers`` picks."""
    if name is not None:
      if name in self.templates:
        return self.templates[name]
      if "{" in name:
        return templating.compile_template(name, "chat_template")
      raise UserError(f"chat_template={name!r}: {self.name} has no such template; choose one of "
                      f"{sorted(self.templates) or 'none'} or pass the Jinja source")
    if tools is not None and "tool_use" in self.templates:
      return self.templates["tool_use"]
    if "default" in self.templates:
      return self.templates["default"]
    if not self.templates:
      raise UserError(f"{self.name}: the tokenizer has no chat template (tokenizer_config.json's chat_template or "
                      f"chat_template.jinja); use a chat model's tokenizer or pass chat_template=")
    raise UserError(f"{self.name}: several chat templates and no 'default' ({sorted(self.templates)}); pass "
                    f"chat_template=NAME")

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: Any = None,
                          chat_template: str | None = None) -> ChatEncoding:
    """Renders and tokenizes ``messages`` (``[{"role", "content"}, ...]``) with the assistant mask.

    Args:
      messages: the chat, e.g. ``[{"role": "user", "content": "hi"}, {"role": "assistant", ...}]``.
      add_generation_prompt: end with the header of a new assistant turn (for sampling).
      tools: None or a list of JSON-schema tool dicts, passed to the template.
      chat_template: a template name (``"default"``, ``"tool_use"``, ...) or Jinja source; None picks
        as ``transformers`` does.

    Returns:
      ``ChatEncoding(ids [n] int32, assistant_mask [n] bool, text)``; the module doc says which tokens
      the mask marks.
    """
    template = self.get_template(chat_template, tools=tools)
    text, spans, from_blocks = templating.render(
        template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
        special_tokens=self.special_tokens)
    encoding = self.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
      mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
      if not from_blocks:  # the end-of-turn token right after the content
        after = np.flatnonzero(offsets[:, 0] == end)
        if after.size and int(ids[after[0]]) in self._special_ids:
          mask[after[0]] = True
    return ChatEncoding(ids=ids, assistant_mask=mask, text=text)


def _set_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
  """Post-processor ``[bos] $A [eos]`` (``transformers``' rule when the config sets add_bos/eos_token)."""
  pieces = [f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None)
  pair = pieces + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None)
  specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
  backend.post_processor = processors.TemplateProcessing(single=" ".join(pieces), pair=" ".join(pair),
                                                                    special_tokens=specials)


def load(spec: str) -> HFTokenizer:
  """``"hf:DIR"`` -> the tokenizer in ``DIR`` (the ``config.data.tokenizer`` spelling)."""
  if not spec.startswith("hf:") or len(spec) == 3:
    raise UserError(f"tokenizer={spec!r}: expected 'hf:DIR' (a Hugging Face tokenizer folder); fix the setting")
  return HFTokenizer.from_dir(spec[3:])


def align_vocab(teacher_vocab_size: int, student_vocab_size: int, teacher_tok: HFTokenizer,
                student_tok: HFTokenizer, field: str) -> int:
  """The number of logit columns to compare teacher and student over.

  Same tokenizer (equal :attr:`HFTokenizer.content_hash`) and models whose vocabularies differ only
  by padding rows (Qwen2.5: 151,936 vs 152,064) -> ``min`` of the two sizes; the tokenizer's tokens
  must fit in both. Different tokenizers -> ``UserError`` naming ``field`` and the cross-tokenizer
  option.

  Args:
    teacher_vocab_size, student_vocab_size: the models' logit columns (embedding rows).
    teacher_tok, student_tok: the tokenizers each model was trained with.
    field: the config field named in errors (e.g. ``"config.teachers[0]"``).
  """
  t_hash, s_hash = teacher_tok.content_hash, student_tok.content_hash
  if t_hash != s_hash:
    raise UserError(f"{field}: the teacher's tokenizer ({teacher_tok.name}, vocab {teacher_tok.vocab_size}, "
                    f"hash {t_hash[:12]}) differs from the student's ({student_tok.name}, vocab "
                    f"{student_tok.vocab_size}, hash {s_hash[:12]}); {CROSS_TOKENIZER}")
  need = teacher_tok.vocab_size
  for who, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
    if int(size) < need:
      raise UserError(f"{field}: the {who}'s vocab_size={size} is smaller than the tokenizer's {need} tokens; "
                      f"use a model with at least {need} embedding rows")
  return min(int(teacher_vocab_size), int(student_vocab_size))
