"""Writes the Hugging Face tokenizer fixtures of tests/test_hf_tokenizer.py, with transformers' answers.

Run once (the output is committed; tests need neither torch nor transformers):

  /work/hfvenv/bin/python tools/make_tokenizer_fixtures.py [--out tests/fixtures/hf_tokenizer]

with a Python 3.11 environment holding ``transformers`` (5.x), ``tokenizers`` and ``jinja2``. It writes
under ``--out``:

* ``chatml/``: a byte-level BPE tokenizer (vocab 400, Qwen2.5-style pre-tokenizer and special tokens
  ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) trained on a few stdlib modules, saved by
  ``PreTrainedTokenizerFast.save_pretrained`` with two chat templates: ``default`` (ChatML, Qwen2.5
  conventions: a default system message, tools as JSON lines, ``add_generation_prompt``) and
  ``generation`` (the same text, assistant content and ``<|im_end|>`` inside ``{% generation %}``);
* ``chatml_v4/``: the same tokenizer in the older Hub layout (``tokenizer_config.json`` holding
  ``added_tokens_decoder``, special tokens as AddedToken dicts, ``chat_template`` as a list of named
  templates, and a ``special_tokens_map.json``), as Qwen2.5's Hub repositories have it;
* ``other/``: a different tokenizer (GPT-2-style pre-tokenizer, vocab 360, trained on other modules,
  ``<s>``/``</s>``/``<unk>``, ``add_bos_token``) for the tokenizer-mismatch test;
* ``expected.json``: transformers' rendered chats, ``apply_chat_template(..., tokenize=True)`` ids
  (and ``assistant_masks`` of the generation template), plain ``encode``/``decode`` results and
  ``len(tokenizer)`` and special-token ids of each tokenizer, and (``other_eos``) of ``other`` loaded
  with ``add_bos_token=False, add_eos_token=True``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import stdlib_bpe
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CHATML = """\
{% if messages[0]['role'] == 'system' %}
  {% set system_message = messages[0]['content'] %}
  {% set loop_messages = messages[1:] %}
{% else %}
  {% set system_message = 'You are a helpful assistant.' %}
  {% set loop_messages = messages %}
{% endif %}
<|im_start|>system
{{ system_message }}
{%- if tools %}


# Tools
<tools>
  {% for tool in tools %}
{{ tool | tojson }}
  {% endfor %}
</tools>
{%- endif %}
<|im_end|>
{% for message in loop_messages %}
  {% if message['role'] not in ['user', 'assistant'] %}
    {{- raise_exception('only user and assistant messages may follow the system message, got ' + message['role']) }}
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Same text as CHATML; the assistant's content and its <|im_end|> are generation blocks.
CHATML_GENERATION = CHATML.replace(
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n",
    "<|im_start|>{{ message['role'] }}\n"
    "  {% if message['role'] == 'assistant' %}\n"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n\n"
    "  {% else %}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "  {% endif %}\n")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Température d'une ville — en °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "la ville"}},
                   "required": ["city"]}}}

CONVERSATIONS = [
    {"name": "system_code", "add_generation_prompt": False, "tools": None, "messages": [
        {"role": "system", "content": "You write short Python answers."},
        {"role": "user", "content": "How do I reverse a list?"},
        {"role": "assistant", "content": "Use slicing:\n\n    items[::-1]\n\nor `items.reverse()` in place."},
        {"role": "user", "content": "And a string?"},
        {"role": "assistant", "content": "The same slice works: `text[::-1]`."}]},
    {"name": "default_system_unicode", "add_generation_prompt": False, "tools": None, "messages": [
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Héllo wörld ✓ 日本語, and a literal <|im_end|> token?"},
        {"role": "assistant", "content": " Ça va — leading space,\ttab and a trailing newline\n"},
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""}]},
    {"name": "tools_generation_prompt", "add_generation_prompt": True, "tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
        {"role": "user", "content": "And in Zürich?"}]},
]

ENCODE_TEXTS = [
    "",
    "def f(x):\n    return x  # ok\n",
    "Héllo wörld ✓ 日本 1234567",
    "text with <|im_end|> and <|endoftext|> and <s> inside",
    "   leading spaces and trailing   ",
]


def train_chatml() -> Tokenizer:
  """Byte-level BPE with a Qwen2.5-like regex split (digits one by one) and ChatML special tokens."""
  return stdlib_bpe.train(["textwrap.py", "string.py", "json/encoder.py"], 400,
                          ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen_split=True)


def train_other() -> Tokenizer:
  """GPT-2-style byte-level BPE (prefix space, default regex) on other modules: other merges and ids."""
  return stdlib_bpe.train(["heapq.py", "bisect.py", "fnmatch.py"], 360, ["<unk>", "<s>", "</s>"], qwen_split=False,
                          prefix_space=True, trim_offsets=True)


def write_v4_layout(src: pathlib.Path, dst: pathlib.Path, hf: PreTrainedTokenizerFast) -> None:
  """The pre-5.0 Hub layout of ``src``: everything in tokenizer_config.json, AddedToken dicts, template list."""
  dst.mkdir(parents=True, exist_ok=True)
  shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")

  def added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}

  decoder = {str(i): added(t.content) for i, t in sorted(hf.added_tokens_decoder.items())}
  config = {
      "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
      "bos_token": None, "clean_up_tokenization_spaces": False,
      "eos_token": {"__type": "AddedToken", **added("<|im_end|>")},
      "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
      "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None,
      "chat_template": [{"name": "default", "template": CHATML}, {"name": "generation", "template": CHATML_GENERATION}],
  }
  (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
  (dst / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": added("<|im_end|>"), "pad_token": added("<|endoftext|>")}, indent=2) + "\n")


def tokenizer_facts(tok: PreTrainedTokenizerFast) -> dict:
  encodes = []
  for text in ENCODE_TEXTS:
    for special in (True, False):
      ids = tok.encode(text, add_special_tokens=special)
      encodes.append({"text": text, "add_special_tokens": special, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
  return {"len": len(tok), "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id, "pad_id": tok.pad_token_id,
          "encode": encodes}


def chat_facts(tok: PreTrainedTokenizerFast) -> list[dict]:
  out = []
  for conv in CONVERSATIONS:
    kwargs = {"add_generation_prompt": conv["add_generation_prompt"], "tools": conv["tools"]}
    text = tok.apply_chat_template(conv["messages"], tokenize=False, **kwargs)
    ids = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=False, **kwargs)
    gen = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=True, chat_template="generation",
                                  return_assistant_tokens_mask=True, **kwargs)
    gen_text = tok.apply_chat_template(conv["messages"], tokenize=False, chat_template="generation", **kwargs)
    assert gen_text == text, "the generation template must render the same text as the default one"
    assert list(gen["input_ids"]) == list(ids)
    out.append({**conv, "text": text, "ids": list(ids), "generation_assistant_masks": list(gen["assistant_masks"])})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures/hf_tokenizer")
  out = pathlib.Path(parser.parse_args().out)
  if out.exists():
    shutil.rmtree(out)

  chatml = PreTrainedTokenizerFast(tokenizer_object=train_chatml(), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
  chatml.chat_template = {"default": CHATML, "generation": CHATML_GENERATION}
  chatml.save_pretrained(out / "chatml")
  other = PreTrainedTokenizerFast(tokenizer_object=train_other(), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", add_bos_token=True)
  other.save_pretrained(out / "other")
  write_v4_layout(out / "chatml", out / "chatml_v4", chatml)

  # Facts come from tokenizers loaded back from disk, as a user would load them.
  loaded = {name: AutoTokenizer.from_pretrained(out / name) for name in ("chatml", "chatml_v4", "other")}
  expected = {name: tokenizer_facts(tok) for name, tok in loaded.items()}
  # The config flags rebuild the post-processor: no BOS, an EOS (tests write them into tokenizer_config.json).
  expected["other_eos"] = tokenizer_facts(AutoTokenizer.from_pretrained(out / "other", add_bos_token=False,
                                                                        add_eos_token=True))
  for name in ("chatml", "chatml_v4"):
    expected[name]["chats"] = chat_facts(loaded[name])
  assert expected["chatml"] == expected["chatml_v4"], "both layouts must load as the same tokenizer"
  (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
  print(f"wrote {sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())}")


if __name__ == "__main__":
  main()
