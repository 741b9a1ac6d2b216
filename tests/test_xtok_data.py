"""Cross-tokenizer rows from instruction data: config.data.teacher_tokenizer (kdlab.data.instruct).

Each example is also tokenized the teacher's way (its own chat template for chats) and aligned into
chunks (kdlab.data.alignment); the batch contract is kdlab.objective.terms.cross_tokenizer's. The
alignment is checked the way it is used: every chunk's target tokens, decoded on each side, are
the same text. Fixtures: tests/fixtures/xtok (two byte-level BPE tokenizers without chat
templates) and tests/fixtures/hf_tokenizer/chatml (ChatML) against xtok/large given a template of
its own here.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdlab.data import instruct, pipeline
from kdlab.data.hf_tokenizer import HFTokenizer
from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError
from kdlab.objective import ModelOutput
from kdlab.train import tasks

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
SMALL, LARGE = FIX / "xtok" / "small", FIX / "xtok" / "large"
CHATML = FIX / "hf_tokenizer" / "chatml"
CHATS = FIX / "instruct" / "chats.jsonl"
XTOK_KEYS = ("teacher_tokens", "teacher_targets", "teacher_token_mask", "student_chunks", "teacher_chunks")
RECORDS = [
    {"prompt": "# reverse a list\n", "completion": "def reverse(items):\n    return items[::-1]\n"},
    {"prompt": "Q: the length?\n", "completion": "len(text) counts characters: 'été' has 3."},
    {"prompt": "# sum of squares\n", "completion": "total = sum(x * x for x in range(10))  # 285\n"},
    {"prompt": "Translate:\n", "completion": "Grüße aus Zürich — 日本語 ✓ done"},
    {"prompt": "", "completion": "An empty prompt."},
    {"text": "import heapq\nheapq.heappush(h, (1, 'a'))\n"},
]
# A Llama-2-like template for the large tokenizer: other markup than ChatML, and it trims the content.
TEACHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] | trim }}"
                    "{{ eos_token }}{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>{% else %}"
                    "[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def small():
  return HFTokenizer.from_dir(SMALL)


@pytest.fixture(scope="module")
def large():
  return HFTokenizer.from_dir(LARGE)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  path = tmp_path_factory.mktemp("xtok") / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
  return f"jsonl:{path}"


@pytest.fixture(scope="module")
def templated_large(tmp_path_factory):
  """xtok/large with a chat template of its own (a different tokenizer and template than ChatML's)."""
  folder = tmp_path_factory.mktemp("large_chat")
  (folder / "tokenizer.json").write_bytes((LARGE / "tokenizer.json").read_bytes())
  config = json.loads((LARGE / "tokenizer_config.json").read_text()) | {"chat_template": TEACHER_TEMPLATE}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


def _load(source, **fields):
  return instruct.load(source, instruct.Options(**{"seq_len": 96, "packing": False, **fields}))


def _write(path, lines):
  path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
  return path


def _rows(*splits):
  """Every row of the splits as one batch (the pipeline's gather)."""
  return [pipeline.gather_text(s, np.arange(len(s))) for s in splits]


def _chunk_texts(batch, s_tok, t_tok):
  """``[[(student text, teacher text) per chunk] per row]``; checks chunk ids are 0..k-1, each a contiguous
  run of counted target positions on both sides."""
  out = []
  for b in range(len(batch["tokens"])):
    s_c, t_c = batch["student_chunks"][b], batch["teacher_chunks"][b]
    k = int(s_c.max(initial=-1)) + 1
    assert set(s_c[s_c >= 0]) == set(t_c[t_c >= 0]) == set(range(k))
    row = []
    for c in range(k):
      for chunks, mask in ((s_c, batch["token_mask"][b]), (t_c, batch["teacher_token_mask"][b])):
        at = np.flatnonzero(chunks == c)
        assert np.all(np.diff(at) == 1) and np.all(mask[at] == 1)
      row.append((s_tok.decode(batch["targets"][b][s_c == c]), t_tok.decode(batch["teacher_targets"][b][t_c == c])))
    out.append(row)
  return out


def test_prompt_completion_rows_carry_the_teachers_tokenization_and_aligned_chunks(pairs, small, large):
  train, val = _load(pairs, tokenizer=f"hf:{SMALL}", teacher_tokenizer=f"hf:{LARGE}", teacher_seq_len=80)
  plain_train, plain_val = _load(pairs, tokenizer=f"hf:{SMALL}")
  assert (train.teacher_seq_len, train.teacher_vocab_size) == (80, large.vocab_size)
  for batch, plain, source in zip(_rows(train, val), _rows(plain_train, plain_val), (train, val)):
    b = len(source)
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k in XTOK_KEYS} == {
        "teacher_tokens": ((b, 80), np.int32), "teacher_targets": ((b, 80), np.int32),
        "teacher_token_mask": ((b, 80), np.float32), "student_chunks": ((b, 96), np.int32),
        "teacher_chunks": ((b, 80), np.int32)}
    for key in plain:  # the student's side is the rows it has without a teacher tokenizer
      np.testing.assert_array_equal(batch[key], plain[key])
    for i, (record, row) in enumerate(zip(source.examples, _chunk_texts(batch, small, large))):
      completion = record.completion if record.text is None else record.text
      pieces = [record.prompt, record.completion] if record.text is None else [record.text]
      want = np.concatenate([large.encode(p, add_special_tokens=False) for p in pieces] + [[large.eos_id]])
      n = len(want)
      np.testing.assert_array_equal(batch["teacher_tokens"][i, :n], want)
      np.testing.assert_array_equal(batch["teacher_targets"][i, :n - 1], want[1:])
      assert np.all(batch["teacher_tokens"][i, n:] == large.pad_id)
      assert batch["teacher_token_mask"][i, n - 1:].sum() == 0
      # The teacher's mask: its completion's tokens and the EOS (a text's tokens after the first).
      head = 0 if record.text is not None else len(large.encode(record.prompt, add_special_tokens=False))
      np.testing.assert_array_equal(batch["teacher_token_mask"][i, :n - 1], np.arange(1, n) >= max(head, 1))
      assert all(s == t for s, t in row)
      # Tokenized apart, the completion's edges are boundaries on both sides: chunks tile it whole
      # (but for an example's first token, which no position predicts: a text's, or after an empty prompt).
      joined = "".join(s for s, _ in row)
      assert joined == completion if head else (completion.endswith(joined) and len(joined) > len(completion) / 2)


def test_a_byte_level_student_aligns_with_a_bpe_teacher(pairs, large):
  train, val = _load(pairs, tokenizer="byte", seq_len=128, teacher_tokenizer=f"hf:{LARGE}", teacher_seq_len=64)
  batch = _rows(train, val)[0]
  for record, row in zip(train.examples, _chunk_texts(batch, ByteTokenizer(), large)):
    assert all(s == t for s, t in row) and row
    if record.text is None and record.prompt:
      assert "".join(s for s, _ in row) == record.completion


def test_teacher_truncation_drops_cut_chunks_and_long_teacher_prompts_are_refused(pairs, small, large, tmp_path):
  full_train, _ = _load(pairs, tokenizer=f"hf:{SMALL}", teacher_tokenizer=f"hf:{LARGE}")
  train, val = _load(pairs, tokenizer=f"hf:{SMALL}", teacher_tokenizer=f"hf:{LARGE}", teacher_seq_len=16)
  assert train.stats["train"]["teacher_truncated"] > 0 and train.stats["train"]["truncated"] == 0
  assert train.stats["train"]["chunks"] < full_train.stats["train"]["chunks"]
  batch = _rows(train)[0]
  for i, row in enumerate(_chunk_texts(batch, small, large)):
    assert all(s == t for s, t in row)
    last = np.flatnonzero(batch["teacher_chunks"][i] >= 0)
    assert not len(last) or last[-1] < 15  # the last position predicts nothing: the row was cut there
  # A prompt that leaves the teacher no counted token: one line naming the record and the field.
  long = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 40 + "\n", "completion": "ok"}] + RECORDS[:3])
  with pytest.raises(UserError, match=r"long\.jsonl:1: the teacher's prompt is \d+ tokens .*"
                                      r"config\.data\.teacher_seq_len=48; raise config\.data\.teacher_seq_len"):
    _load(f"jsonl:{long}", tokenizer=f"hf:{SMALL}", seq_len=128, teacher_tokenizer=f"hf:{LARGE}", teacher_seq_len=48)
  dropped = _load(f"jsonl:{long}", tokenizer=f"hf:{SMALL}", seq_len=128, teacher_tokenizer=f"hf:{LARGE}",
                  teacher_seq_len=48, drop_long=True)
  assert [s.stats[s.split]["dropped"] for s in dropped] in ([1, 0], [0, 1])
  assert all(r.where != f"{long}:1" for s in dropped for r in s.examples)


@pytest.mark.parametrize("template, loss_mask", [(None, "completion"), ("generation", "last_turn")])
def test_chats_rendered_by_two_chat_templates_align_turn_by_turn(templated_large, template, loss_mask):
  chatml, teacher = HFTokenizer.from_dir(CHATML), HFTokenizer.from_dir(templated_large)
  fields = dict(tokenizer=f"hf:{CHATML}", seq_len=256, chat_template=template, loss_mask=loss_mask)
  train, val = _load(f"jsonl:{CHATS}", teacher_tokenizer=f"hf:{templated_large}", teacher_seq_len=224, **fields)
  plain = _rows(*_load(f"jsonl:{CHATS}", **fields))
  covered = 0
  for batch, plain_batch, source in zip(_rows(train, val), plain, (train, val)):
    for key in plain_batch:
      np.testing.assert_array_equal(batch[key], plain_batch[key])
    for i, (record, row) in enumerate(zip(source.examples, _chunk_texts(batch, chatml, teacher))):
      messages = list(record.messages)
      # The teacher's side is its own chat template's rendering (ends with its </s>: no EOS added).
      want = teacher.apply_chat_template(messages, chat_template=None)
      n = len(want.ids)
      np.testing.assert_array_equal(batch["teacher_tokens"][i, :n], want.ids)
      counted = want.assistant_mask[1:n].astype(np.float32)
      if loss_mask == "last_turn":
        last = np.flatnonzero(want.assistant_mask)
        runs = np.split(last, np.flatnonzero(np.diff(last) > 1) + 1)
        counted = np.isin(np.arange(1, n), runs[-1]).astype(np.float32)
      np.testing.assert_array_equal(batch["teacher_token_mask"][i, :n - 1], counted)
      assert all(s == t for s, t in row)
      # Chunks lie inside the assistant contents (trimmed, as the teacher renders them), in order.
      contents = [m["content"].strip() for m in messages if m["role"] == "assistant"]
      if loss_mask == "last_turn":
        contents = contents[-1:]
      rest = "\n".join(contents)
      for s, _ in row:
        assert s in rest
        rest = rest[rest.index(s) + len(s):]
      covered += sum(len(s) for s, _ in row) / max(1, sum(len(c) for c in contents))
  assert covered / (len(train) + len(val)) > 0.6  # most of the content is aligned


def test_bad_cross_tokenizer_settings_are_one_line_errors(pairs, tmp_path):
  with pytest.raises(UserError, match=r"^config\.data\.packing=True: .*set config\.data\.packing=False$"):
    instruct.options(ml_collections.ConfigDict({"teacher_tokenizer": f"hf:{LARGE}"}), 64)
  with pytest.raises(UserError, match=r"^config\.data\.teacher_tokenizer='large': use 'hf:DIR'"):
    instruct.options(ml_collections.ConfigDict({"teacher_tokenizer": "large", "packing": False}), 64)
  with pytest.raises(UserError, match=r"^config\.data\.teacher_seq_len=0: must be an int >= 1"):
    instruct.options(ml_collections.ConfigDict({"teacher_tokenizer": f"hf:{LARGE}", "packing": False,
                                                "teacher_seq_len": 0}), 64)
  # Chats need the teacher's chat template too.
  with pytest.raises(UserError, match=r"chats\.jsonl:1: a messages record needs a chat template but "
                                      r"config\.data\.teacher_tokenizer='hf:.*large' has no chat template; .*"
                                      r"config\.data\.teacher_tokenizer='hf:DIR'"):
    _load(f"jsonl:{CHATS}", tokenizer=f"hf:{CHATML}", seq_len=160, teacher_tokenizer=f"hf:{LARGE}")
  # Not instruction data: the task refuses it.
  cfg = ml_collections.ConfigDict({"source": "pysrc", "seq_len": 32, "teacher_tokenizer": f"hf:{LARGE}",
                                   "packing": False})
  with pytest.raises(UserError, match=r"^config\.data\.teacher_tokenizer='hf:.*': the teacher's own tokenization "
                                      r"needs examples from jsonl:PATH or parquet:PATH, not 'pysrc'"):
    tasks.LANGUAGE_MODEL.load(cfg)


def _out(batch, length, vocab):
  return ModelOutput(jax.ShapeDtypeStruct((batch, length, vocab), jnp.float32), {})


def test_the_task_batches_and_checks_cross_tokenizer_teachers(pairs, small, large):
  cfg = ml_collections.ConfigDict({"source": pairs, "seq_len": 96, "tokenizer": f"hf:{SMALL}", "packing": False,
                                   "teacher_tokenizer": f"hf:{LARGE}", "teacher_seq_len": 80, "batch_size": 2,
                                   "eval_batch_size": 4})
  task = tasks.LANGUAGE_MODEL
  train, val = task.load(cfg)
  abstract = task.abstract_batch(train, 2)
  batch = task.train_dataset(train, cfg, seed=0)[0]
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == \
         {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert set(XTOK_KEYS) <= set(batch)
  # Eval padding: no row, no chunk.
  last = list(task.eval_batches(val, cfg))[-1]
  pad = ~last["mask"]
  assert pad.any() and np.all(last["student_chunks"][pad] == -1) and np.all(last["teacher_chunks"][pad] == -1)
  assert last["teacher_token_mask"][pad].sum() == 0
  # Teachers may have the teacher tokenizer's vocabulary (>= its tokens) or the student's; not less.
  s_out = _out(2, 96, small.vocab_size)
  task.check_outputs(s_out, [_out(2, 80, large.vocab_size), _out(2, 80, 512), _out(2, 96, small.vocab_size)],
                     train, cfg)
  with pytest.raises(UserError, match=r"^config\.teachers\[1\]: the teacher's vocab_size=400 is smaller than the "
                                      rf"{large.vocab_size} tokens of config\.data\.teacher_tokenizer"):
    task.check_outputs(s_out, [_out(2, 80, large.vocab_size), _out(2, 80, 400)], train, cfg)
  # Without a teacher tokenization a different vocabulary is still refused.
  plain_cfg = ml_collections.ConfigDict({**cfg.to_dict(), "teacher_tokenizer": None})
  plain_train, _ = task.load(plain_cfg)
  assert not set(XTOK_KEYS) & set(task.abstract_batch(plain_train, 2))
  with pytest.raises(UserError, match=r"^config\.teachers\[0\]: the teacher's vocab_size is 500 but the student's 300"):
    task.check_outputs(s_out, [_out(2, 96, large.vocab_size)], plain_train, plain_cfg)
