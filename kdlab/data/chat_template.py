"""Chat templates: render Hugging Face Jinja chat templates as ``transformers`` does, with assistant spans.

Rendering matches ``transformers``' ``apply_chat_template(..., tokenize=False)``: a sandboxed,
immutable Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that does not escape HTML and keeps non-ASCII characters
(``json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)``), the globals
``raise_exception(message)`` and ``strftime_now(format)`` (local time), and the
``{% generation %}...{% endgeneration %}`` tag marking what the assistant generates. The template
sees ``messages``, ``tools``, ``documents`` (None), ``add_generation_prompt`` and the named special
tokens (``bos_token``, ``eos_token``, ...) as strings. Message keys whose value is None are dropped
and reasoning given as ``thinking`` / ``reasoning`` / ``reasoning_content`` is visible under
``thinking`` and ``reasoning_content``, as ``transformers`` does.

Assistant spans (character offsets ``[start, end)`` into the rendered text):

* templates with ``{% generation %}`` blocks: each block's output. The block wraps its output in
  two Unicode noncharacters (U+FDD0, U+FDD1) that are removed after rendering, so the offsets hold
  wherever the block sits (loops, macros, ``set`` blocks); inputs holding those characters are
  refused.
* other templates: each assistant message's rendered content, found by rendering the chat once
  more with every assistant content replaced by a unique placeholder; the template text around the
  placeholders must then occur unchanged in the real rendering, and the content is what lies
  between (so a template that trims the content gives the trimmed span).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from kdlab.errors import UserError

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"  # around {% generation %} output while rendering
_HOLE = re.compile("\ufdd2(\\d+)\ufdd3")  # placeholder of the k-th assistant content
_RESERVED = re.compile("[\ufdd0-\ufdd3]")
_HAS_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_FIX = "pass a list of {'role': ..., 'content': ...} dicts"


class _Generation(jinja2.ext.Extension):
  """``{% generation %}body{% endgeneration %}``: the body's output, between the two span markers."""

  tags = {"generation"}

  def parse(self, parser: Any) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

  def _mark(self, caller: Any) -> str:
    return _OPEN + caller() + _CLOSE


class _Namespace(jinja2.utils.Namespace):
  """``namespace(...)`` that refuses underscore attributes (no reach into Python internals)."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's signature, ``self`` may be a key
    self, rest = args[0], args[1:]
    attrs = dict(*rest, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: names starting with '_' are refused")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
  return dict(*args, **kwargs)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_make_dict,
                     namespace=_Namespace)
  return env


@dataclasses.dataclass(frozen=True)
class Template:
  """A compiled chat template; ``source`` is its Jinja text, ``has_generation`` whether it marks generations."""

  source: str
  compiled: jinja2.Template
  has_generation: bool


@functools.lru_cache(maxsize=32)
def compile_template(source: str, where: str = "chat_template") -> Template:
  """Compiles ``source``; a syntax error is a ``UserError`` naming ``where`` (the file or field) and the line."""
  if not isinstance(source, str):
    raise UserError(f"{where}: a chat template must be a string, got {type(source).__name__}; fix the tokenizer files")
  try:
    compiled = _environment().from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise UserError(f"{where}: bad Jinja template at line {e.lineno}: {e.message}; fix the template") from None
  return Template(source, compiled, bool(_HAS_GENERATION.search(source)))


def _plain(value: Any) -> Any:
  """JSON-like copy of template input: other objects become an inert ``"<TypeName>"`` string."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, np.generic):
    return _plain(value.item())
  for kind in (str, bool, int, float):  # subclasses (enums, ...) back to the base type
    if isinstance(value, kind):
      return kind(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return f"<{type(value).__name__}>"


def check_messages(messages: Any) -> list[dict]:
  """``messages`` as the template sees them; a ``UserError`` unless a non-empty list of role/content dicts."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError(f"messages: expected a non-empty list of messages, got {type(messages).__name__}; {_FIX}")
  out = []
  for i, message in enumerate(messages):
    if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
      raise UserError(f"messages[{i}]: expected a dict with 'role' and 'content' strings, got "
                      f"{repr(message)[:80]}; {_FIX}")
    message = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def check_tools(tools: Any) -> list[dict] | None:
  """``tools`` as the template sees them: None or a list of JSON-schema dicts."""
  if tools is None:
    return None
  if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
    raise UserError("tools: expected a list of JSON-schema dicts ({'type': 'function', 'function': {...}}); "
                    "describe each tool as a dict")
  return _plain(list(tools))


def _refuse_reserved(value: Any, where: str) -> None:
  if isinstance(value, str):
    if _RESERVED.search(value):
      raise UserError(f"{where}: holds a character in U+FDD0..U+FDD3 (Unicode noncharacters kdlab reserves to "
                      f"locate assistant turns); remove it")
  elif isinstance(value, Mapping):
    for k, v in value.items():
      _refuse_reserved(v, f"{where}[{k!r}]")
  elif isinstance(value, list):
    for i, v in enumerate(value):
      _refuse_reserved(v, f"{where}[{i}]")


def _render_raw(template: Template, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                special_tokens: Mapping[str, str]) -> str:
  try:
    return template.compiled.render(**special_tokens, messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt)
  except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    raise UserError(f"messages: the chat template failed on them: {message}; fix the messages (or the template)") \
        from None


def _generation_spans(marked: str) -> tuple[str, list[tuple[int, int]]]:
  """Removes the generation markers; returns the text and the marked spans in it (sorted by start)."""
  text, spans, opened, pos = [], [], [], 0
  for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
    if piece == _OPEN:
      opened.append(pos)
    elif piece == _CLOSE:
      if not opened:
        raise UserError("chat_template: a {% generation %} block's output was cut by the template; keep "
                        "generation blocks whole")
      spans.append((opened.pop(), pos))
    else:
      text.append(piece)
      pos += len(piece)
  if opened:
    raise UserError("chat_template: a {% generation %} block's output was cut by the template; keep generation "
                    "blocks whole")
  return "".join(text), sorted(spans)


def _content_spans(template: Template, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                   special_tokens: Mapping[str, str], text: str) -> list[tuple[int, int]]:
  """Spans of the assistant contents in ``text`` (see module doc): placeholders, then the pieces between them."""
  fail = UserError("chat_template: cannot locate the assistant messages in the rendered chat (the template "
                   "rewrites them); mark them with {% generation %} ... {% endgeneration %} blocks")
  holes = [dict(m, content=f"\ufdd2{i}\ufdd3") if m["role"] == "assistant" else m for i, m in enumerate(messages)]
  try:
    parts = _HOLE.split(_render_raw(template, holes, tools, add_generation_prompt, special_tokens))
  except UserError:  # the template reads the content itself (it renders the real one)
    raise fail from None
  pieces = parts[::2]  # template text around the placeholders; parts[1::2] are the message indices
  if [int(i) for i in parts[1::2]] != sorted({int(i) for i in parts[1::2]}) or not text.startswith(pieces[0]):
    raise fail
  spans, pos = [], len(pieces[0])
  for k, after in enumerate(pieces[1:], start=1):
    if k == len(pieces) - 1:
      end = len(text) - len(after)
      if not text.endswith(after) or end < pos:
        raise fail
    else:
      end = text.find(after, pos) if after else -1
      if end < 0:
        raise fail
    spans.append((pos, end))
    pos = end + len(after)
  return spans


def render(template: Template, messages: Any, *, tools: Any = None, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None) -> tuple[str, list[tuple[int, int]], bool]:
  """Renders a chat; returns ``(text, assistant spans, from_generation_blocks)``.

  Args:
    template: from :func:`compile_template`.
    messages: ``[{"role": str, "content": str, ...}, ...]``.
    tools: None or a list of JSON-schema dicts.
    add_generation_prompt: end with the header of a new assistant turn.
    special_tokens: ``{"eos_token": "<|im_end|>", ...}`` passed to the template.

  Returns:
    The rendered text; character spans ``[start, end)`` of the assistant turns (the generation
    blocks' output when ``from_generation_blocks``, else each assistant message's content, in
    message order); the flag.
  """
  messages, tools = check_messages(messages), check_tools(tools)
  special_tokens = dict(special_tokens or {})
  if template.has_generation:
    _refuse_reserved(messages, "messages")
    _refuse_reserved(tools, "tools")
    text, spans = _generation_spans(_render_raw(template, messages, tools, add_generation_prompt, special_tokens))
    return text, spans, True
  text = _render_raw(template, messages, tools, add_generation_prompt, special_tokens)
  if not any(m["role"] == "assistant" for m in messages):
    return text, [], False
  _refuse_reserved(messages, "messages")
  _refuse_reserved(tools, "tools")
  return text, _content_spans(template, messages, tools, add_generation_prompt, special_tokens, text), False
