"""Hugging Face tokenizers and chat templates (kdlab.data.hf_tokenizer) against transformers' recorded answers.

tests/fixtures/hf_tokenizer/ and its expected.json were written by tools/make_tokenizer_fixtures.py with
transformers; these tests need neither torch nor transformers.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil

import numpy as np
import pytest

from kdlab.data import hf_tokenizer, text
from kdlab.data.hf_tokenizer import HFTokenizer
from kdlab.errors import UserError

FIX = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_tokenizer"
EXPECTED = json.loads((FIX / "expected.json").read_text(encoding="utf-8"))
CHATS = EXPECTED["chatml"]["chats"]
END = "<|im_end|>"


@pytest.fixture(scope="module")
def toks() -> dict[str, HFTokenizer]:
  return {name: HFTokenizer.from_dir(FIX / name) for name in ("chatml", "chatml_v4", "other")}


def _runs(tok: HFTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """The text of each maximal run of masked tokens."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def _copy(tmp_path: pathlib.Path, name: str, config: dict | None = None, template: str | None = None) -> pathlib.Path:
  """The fixture ``name``'s tokenizer.json in a fresh folder, with ``config`` and ``template`` files."""
  folder = tmp_path / name
  folder.mkdir()
  shutil.copy(FIX / name / "tokenizer.json", folder / "tokenizer.json")
  if config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
  if template is not None:
    (folder / "chat_template.jinja").write_text(template)
  return folder


@pytest.mark.parametrize("name", ["chatml", "chatml_v4", "other"])
def test_encode_decode_and_special_ids_match_transformers(toks, name):
  tok, want = toks[name], EXPECTED[name]
  assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (want["len"], want["eos_id"], want["bos_id"],
                                                                 want["pad_id"])
  for case in want["encode"]:
    ids = tok.encode(case["text"], add_special_tokens=case["add_special_tokens"])
    assert ids.dtype == np.int32 and ids.tolist() == case["ids"], case
    assert tok.decode(ids) == case["decoded"]
    assert tok.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]
  assert [e.tolist() for e in tok.encode_batch([c["text"] for c in want["encode"][::2]])] == \
      [c["ids"] for c in want["encode"][::2]]


def test_add_bos_eos_flags_rebuild_the_post_processor(tmp_path):
  """other's tokenizer.json adds <s>; add_bos_token=false, add_eos_token=true in the config give no BOS and an EOS."""
  config = {**json.loads((FIX / "other" / "tokenizer_config.json").read_text()), "add_bos_token": False,
            "add_eos_token": True}
  tok = HFTokenizer.from_dir(_copy(tmp_path, "other", config))
  for case in EXPECTED["other_eos"]["encode"]:
    assert tok.encode(case["text"], add_special_tokens=case["add_special_tokens"]).tolist() == case["ids"], case


def test_config_tokens_missing_from_tokenizer_json_are_added_and_the_legacy_map_wins(tmp_path):
  config = {"added_tokens_decoder": {"400": {"content": "<|tool|>", "special": True, "normalized": False}},
            "eos_token": {"__type": "AddedToken", "content": "<|stop|>"}, "pad_token": "<|endoftext|>"}
  tok = HFTokenizer.from_dir(_copy(tmp_path, "chatml", config))
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (402, 401, 0)
  assert tok.encode("a<|tool|><|stop|>").tolist()[-2:] == [400, 401]
  assert tok.decode(tok.encode("a<|tool|>b"), skip_special_tokens=True) == "ab"
  # Without added_tokens_decoder (the old layout) special_tokens_map.json overrides the config's entries.
  (tmp_path / "legacy").mkdir()
  legacy = _copy(tmp_path / "legacy", "chatml", {"eos_token": "<|endoftext|>"})
  (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": END, "special": True}}))
  assert HFTokenizer.from_dir(legacy).eos_id == 2


@pytest.mark.parametrize("name", ["chatml", "chatml_v4"])
@pytest.mark.parametrize("chat", CHATS, ids=[c["name"] for c in CHATS])
def test_chat_ids_and_generation_masks_match_transformers(toks, name, chat):
  """Both layouts (.jinja files; config with a template list) render and tokenize as transformers does, and the
  {% generation %} template's mask is transformers' assistant_masks."""
  tok = toks[name]
  kwargs = {"add_generation_prompt": chat["add_generation_prompt"], "tools": chat["tools"]}
  plain = tok.apply_chat_template(chat["messages"], **kwargs)
  assert plain.text == chat["text"]
  assert plain.ids.dtype == np.int32 and plain.ids.tolist() == chat["ids"]
  gen = tok.apply_chat_template(chat["messages"], chat_template="generation", **kwargs)
  assert gen.text == chat["text"] and gen.ids.tolist() == chat["ids"]
  assert gen.assistant_mask.dtype == bool and gen.assistant_mask.astype(int).tolist() == \
      chat["generation_assistant_masks"]


@pytest.mark.parametrize("chat", CHATS, ids=[c["name"] for c in CHATS])
def test_plain_template_mask_is_each_assistant_content_and_its_end_token(toks, chat):
  """Without generation blocks the mask is found from character offsets: content + <|im_end|>, nothing else."""
  tok = toks["chatml"]
  enc = tok.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"],
                                tools=chat["tools"])
  assistant = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
  assert _runs(tok, enc.ids, enc.assistant_mask) == [c + END for c in assistant]
  assert enc.assistant_mask.astype(int).tolist() == chat["generation_assistant_masks"]


def test_spans_follow_a_template_that_trims_content_and_generation_blocks_in_macros(tmp_path):
  trimmed = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
             "{% endfor %}")
  tok = HFTokenizer.from_dir(_copy(tmp_path, "chatml", {"eos_token": END}, trimmed))
  messages = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "  yes \n"},
              {"role": "user", "content": "more"}, {"role": "assistant", "content": "\tdone."}]
  enc = tok.apply_chat_template(messages)
  assert _runs(tok, enc.ids, enc.assistant_mask) == ["yes" + END, "done." + END]

  macro = ("{% macro turn(m) %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
           "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endmacro %}"
           "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ turn(m) }}{% endfor %}"
           "{{ ns.n }}")
  enc = tok.apply_chat_template(messages, chat_template=macro)
  assert enc.text.endswith(END + "4") and "\ufdd0" not in enc.text
  assert _runs(tok, enc.ids, enc.assistant_mask) == ["  yes \n" + END, "\tdone." + END]


def test_template_globals_filters_and_sandbox(toks):
  tok = toks["chatml"]
  msgs = [{"role": "user", "content": "hi"}]
  year = tok.apply_chat_template(msgs, chat_template="{{ strftime_now('%Y') }}").text
  assert year in {str(datetime.datetime.now().year), str(datetime.datetime.now().year - 1)}
  value = {"b": "é<&>", "a": [1, 2.5, None, True]}
  for args, kwargs in (("", {}), ("indent=2, sort_keys=true", {"indent": 2, "sort_keys": True}),
                       ("separators=(',', ':')", {"separators": (",", ":")})):
    rendered = tok.apply_chat_template([{"role": "user", "content": "x", "data": value}],
                                       chat_template=f"{{{{ messages[0]['data'] | tojson({args}) }}}}").text
    assert rendered == json.dumps(value, ensure_ascii=False, **kwargs)
  assert tok.apply_chat_template(msgs, chat_template="{{ eos_token }}|{{ pad_token }}|{{ bos_token }}").text == \
      "<|im_end|>|<|endoftext|>|"
  # As transformers: keys holding None are dropped; reasoning under any of its names is read as reasoning_content.
  reading = "{% for m in messages %}{{ 'tool_calls' in m }}:{{ m.reasoning_content }}/{{ m.thinking }};{% endfor %}"
  chat = [{"role": "user", "content": "a", "tool_calls": None}, {"role": "assistant", "content": "b", "thinking": "t"},
          {"role": "assistant", "content": "c", "reasoning": "r"}]
  assert tok.apply_chat_template(chat, chat_template=reading).text == "False:/;False:t/t;False:r/r;"
  with pytest.raises(UserError, match="no tools here"):
    tok.apply_chat_template(msgs, chat_template="{{ raise_exception('no tools here') }}")
  with pytest.raises(UserError, match="_secret"):
    tok.apply_chat_template(msgs, chat_template="{% set ns = namespace(_secret=1) %}")
  with pytest.raises(UserError, match="unsafe|immutable"):
    tok.apply_chat_template(msgs, chat_template="{{ messages.append(1) }}")
  with pytest.raises(UserError, match="unsafe"):
    tok.apply_chat_template(msgs, chat_template="{{ messages.__class__.__subclasses__() }}")
  assert msgs == [{"role": "user", "content": "hi"}]


def test_template_choice(tmp_path, toks):
  config = {"eos_token": END, "chat_template": [{"name": "default", "template": "D{{ tools | length if tools else 0 }}"},
                                                {"name": "tool_use", "template": "T{{ tools | length }}"}]}
  tok = HFTokenizer.from_dir(_copy(tmp_path, "chatml", config))
  msgs = [{"role": "user", "content": "hi"}]
  assert tok.apply_chat_template(msgs).text == "D0"
  assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]).text == "T1"
  assert tok.apply_chat_template(msgs, chat_template="default", tools=[{}, {}]).text == "D2"
  with pytest.raises(UserError, match="no such template"):
    tok.apply_chat_template(msgs, chat_template="nope")
  with pytest.raises(UserError, match="no chat template"):
    toks["other"].apply_chat_template(msgs)
  (tmp_path / "several").mkdir()
  shutil.copy(FIX / "chatml" / "tokenizer.json", tmp_path / "several")
  (tmp_path / "several" / "additional_chat_templates").mkdir()
  (tmp_path / "several" / "additional_chat_templates" / "a.jinja").write_text("A")
  with pytest.raises(UserError, match="no 'default'"):
    HFTokenizer.from_dir(tmp_path / "several").apply_chat_template(msgs)


def _one_line_error(fn, match: str) -> None:
  with pytest.raises(UserError, match=match) as info:
    fn()
  assert "\n" not in str(info.value) and ";" in str(info.value)


def test_bad_input_is_a_one_line_user_error(tmp_path, toks):
  _one_line_error(lambda: HFTokenizer.from_dir(tmp_path), "no tokenizer.json")
  _one_line_error(lambda: hf_tokenizer.load("hf:"), "hf:DIR")
  bad = _copy(tmp_path, "chatml", {"eos_token": END}, "{% for m in messages %}{{ m.content }")
  _one_line_error(lambda: HFTokenizer.from_dir(bad), r"chat_template.jinja: bad Jinja template at line 1")
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "tokenizer.json").write_text("{}")
  _one_line_error(lambda: HFTokenizer.from_dir(tmp_path / "broken"), "not a tokenizers file")
  tok = toks["chatml"]
  for messages, match in (([], "non-empty list"), ("hello", "non-empty list"),
                          ([{"role": "user"}], r"messages\[0\]: expected a dict with 'role' and 'content'"),
                          ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]"),
                          ([{"role": "user", "content": ["a"]}], r"messages\[0\]"),
                          ([{"role": "tool", "content": "x"}], "only user and assistant")):
    _one_line_error(lambda: tok.apply_chat_template(messages), match)
  _one_line_error(lambda: tok.apply_chat_template([{"role": "user", "content": "a\ufdd0"}], chat_template="generation"),
                  "U\\+FDD0")
  _one_line_error(lambda: tok.apply_chat_template([{"role": "user", "content": "a"}], tools="get_weather"), "tools")


def test_align_vocab_slices_padding_and_refuses_other_tokenizers(tmp_path, toks):
  chatml, v4, other = toks["chatml"], toks["chatml_v4"], toks["other"]
  assert chatml.content_hash == v4.content_hash != other.content_hash
  # Qwen2.5-like: one tokenizer, models padded to different row counts.
  assert hf_tokenizer.align_vocab(512, 448, chatml, v4, "config.teachers[0]") == 448
  assert hf_tokenizer.align_vocab(400, 512, chatml, chatml, "config.teachers[0]") == 400
  _one_line_error(lambda: hf_tokenizer.align_vocab(399, 512, chatml, v4, "config.teachers[0]"),
                  r"config.teachers\[0\]: the teacher's vocab_size=399 is smaller than the tokenizer's 400")
  with pytest.raises(UserError, match=r"^config.teachers\[1\]: .*differs.*; to distil across tokenizers set "
                                      r"config.data.teacher_tokenizer=.*\(docs/llm_workflow.md\)$"):
    hf_tokenizer.align_vocab(512, 512, chatml, other, "config.teachers[1]")
  # The hash is of the contents, not the file bytes: re-serialized -> same; one merge less -> different.
  data = json.loads((FIX / "chatml" / "tokenizer.json").read_text(encoding="utf-8"))
  (_copy(tmp_path, "chatml") / "tokenizer.json").write_text(json.dumps(data, sort_keys=True))
  assert HFTokenizer.from_dir(tmp_path / "chatml").content_hash == chatml.content_hash
  data["model"]["merges"] = data["model"]["merges"][:-1]
  (tmp_path / "fewer").mkdir()
  (tmp_path / "fewer" / "tokenizer.json").write_text(json.dumps(data))
  fewer = HFTokenizer.from_dir(tmp_path / "fewer")
  assert fewer.vocab_size == chatml.vocab_size and fewer.content_hash != chatml.content_hash


def test_pysrc_packs_documents_with_an_hf_tokenizer():
  """``tokenizer="hf:DIR"``: the same documents as bytes, BPE ids, each ended by the tokenizer's eos_token."""
  spec = f"hf:{FIX / 'chatml'}"
  hf = text.pysrc("train", seq_len=32, max_bytes=5600, tokenizer=spec)
  ref = text.pysrc("train", seq_len=32, max_bytes=5600)

  def documents(packed: text.PackedText, eod: int, decode) -> list[str]:
    stream = np.concatenate([packed.tokens[0, :1], packed.targets[packed.mask > 0]])
    cuts = np.flatnonzero(stream == eod)
    assert cuts[-1] == len(stream) - 1
    return [decode(d) for d in np.split(stream, cuts + 1)[:-1]]

  tok = text.tokenizer_for(spec)
  ours = documents(hf, tok.eos_id, lambda d: tok.decode(d[:-1]))
  assert len(ours) == 4 and ours == documents(ref, 0, lambda d: text.ByteTokenizer().decode(d[:-1]))
  assert hf.tokens.max() < 400 and hf.num_tokens < ref.num_tokens / 1.5  # merges make fewer tokens than bytes
  source = text.load_text("pysrc", "validation", seq_len=16, max_bytes=1000, tokenizer=spec)
  assert source.vocab_size == 400 and source.records.tokens.max() < 400
  with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
    text.pysrc("train", seq_len=8, max_bytes=100, tokenizer="sentencepiece")
  with pytest.raises(UserError, match="no tokenizer.json"):
    text.pysrc("train", seq_len=8, max_bytes=100, tokenizer="hf:/nonexistent/dir")
