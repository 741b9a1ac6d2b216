"""Instruction/chat data from local files (kdlab.data.instruct) and packing (kdlab.data.packing).

The chat ids and assistant masks are checked against transformers' answers recorded in
tests/fixtures/hf_tokenizer/expected.json (tools/make_tokenizer_fixtures.py); tests/fixtures/instruct/
holds small jsonl and parquet files.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from kdlab.data import instruct, packing, pipeline
from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
DATA = FIX / "instruct"
CHATML = f"hf:{FIX / 'hf_tokenizer' / 'chatml'}"
OTHER = f"hf:{FIX / 'hf_tokenizer' / 'other'}"  # no chat template; adds a BOS
EXPECTED = json.loads((FIX / "hf_tokenizer" / "expected.json").read_text(encoding="utf-8"))
PAIRS = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
BYTES = ByteTokenizer()


def _load(source, **fields):
  return instruct.load(source, instruct.Options(**{"seq_len": 128, **fields}))


def _examples(src):
  """``[(where, tokens [n], mask [n])]`` of every example of a split, cut back out of its packed rows."""
  r = src.records
  out = []
  for e, record in enumerate(src.examples):
    row, start, n = r.example_row[e], r.example_start[e], r.example_length[e]
    out.append((record.where, r.tokens[row, start:start + n], r.mask[row, start:start + n]))
  return out


def _all_examples(source, **fields):
  train, val = _load(source, **fields)
  return {where: (tokens, mask) for where, tokens, mask in _examples(train) + _examples(val)}


def _write(path: pathlib.Path, lines: list) -> pathlib.Path:
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
  return path


def _counted_text(tok, tokens, mask):
  """The text of the tokens the mask counts as targets (token t + 1 for mask[t])."""
  return tok.decode(tokens[1:][mask[:-1] > 0])


# --- record shapes and files ---------------------------------------------------------------------

def test_prompt_completion_and_text_records_with_bytes():
  examples = _all_examples(f"jsonl:{DATA / 'pairs.jsonl'}")
  assert len(examples) == len(PAIRS)
  for line, record in enumerate(PAIRS, start=1):
    tokens, mask = examples[f"{DATA / 'pairs.jsonl'}:{line}"]
    body = record.get("text", record.get("prompt", "") + record.get("completion", ""))
    assert BYTES.decode(tokens) == body + "\0"  # ends with EOD
    assert mask[-1] == 0  # the last token predicts nothing inside the example
    counted = record.get("completion", record.get("text"))
    if "text" in record:  # every target counts (the first token is never a target)
      assert _counted_text(BYTES, tokens, mask) == body[1:] + "\0"
    else:  # the completion and the EOD (with an empty prompt the first token has no token before it)
      assert _counted_text(BYTES, tokens, mask) == counted[not record["prompt"]:] + "\0"


def test_parquet_and_a_folder_of_files_give_the_jsonl_examples(tmp_path):
  want = _all_examples(f"jsonl:{DATA / 'pairs.jsonl'}")
  got = _all_examples(f"parquet:{DATA / 'pairs.parquet'}")
  assert sorted(got) == [f"{DATA / 'pairs.parquet'}: row {i}" for i in range(len(PAIRS))]  # rows counted from 0
  for i in range(len(PAIRS)):
    for a, b in zip(want[f"{DATA / 'pairs.jsonl'}:{i + 1}"], got[f"{DATA / 'pairs.parquet'}: row {i}"]):
      np.testing.assert_array_equal(a, b)
  # Chats from parquet (a list of structs; null struct fields are absent): the jsonl chats.
  import pyarrow as pa
  import pyarrow.parquet as pq
  chats = [json.loads(line) for line in (DATA / "chats.jsonl").read_text(encoding="utf-8").splitlines()]
  rows = [{"messages": [dict(m, name=None) for m in c["messages"]]} for c in chats]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
  want = _all_examples(f"jsonl:{DATA / 'chats.jsonl'}", tokenizer=CHATML, seq_len=256)
  got = _all_examples(f"parquet:{tmp_path / 'chats.parquet'}", tokenizer=CHATML, seq_len=256)
  for i in range(len(chats)):
    for a, b in zip(want[f"{DATA / 'chats.jsonl'}:{i + 1}"], got[f"{tmp_path / 'chats.parquet'}: row {i}"]):
      np.testing.assert_array_equal(a, b)
  # A folder of files: read in sorted order (b before c), other files ignored, split by content hash.
  folder = tmp_path / "data"
  folder.mkdir()
  _write(folder / "c.jsonl", PAIRS[4:])
  _write(folder / "b.jsonl", PAIRS[:4])
  (folder / "notes.txt").write_text("ignored")
  train, val = _load(f"jsonl:{folder}")
  single_train, single_val = _load(f"jsonl:{DATA / 'pairs.jsonl'}")
  assert [r.content() for r in train.examples] == [r.content() for r in single_train.examples]
  assert [r.content() for r in val.examples] == [r.content() for r in single_val.examples]
  assert train.examples[0].where == f"{folder / 'b.jsonl'}:1"


def test_train_and_validation_folders_are_the_splits():
  train, val = _load(f"jsonl:{DATA / 'splits'}", validation_fraction=0.9)  # the fraction does not apply
  assert [r.content() for r in train.examples] == PAIRS[:6]  # train/a.jsonl then train/b.jsonl
  assert [r.content() for r in val.examples] == PAIRS[6:]
  assert train.stats == val.stats and train.stats["train"]["examples"] == 6


def test_chat_ids_and_assistant_masks_match_transformers():
  """Records holding the fixture's chats give transformers' ``apply_chat_template`` ids; with the template
  of generation blocks the counted targets are exactly transformers' ``assistant_masks``."""
  chats = EXPECTED["chatml"]["chats"][:2]  # chats ending with an assistant turn
  for template in ("generation", None):
    examples = _all_examples(f"jsonl:{DATA / 'chats.jsonl'}", tokenizer=CHATML, seq_len=256, chat_template=template)
    for line, chat in enumerate(chats, start=1):
      tokens, mask = examples[f"{DATA / 'chats.jsonl'}:{line}"]
      assert tokens.tolist() == chat["ids"]  # ends with the template's <|im_end|>\n: no EOS appended
      # Both templates mark each assistant content and its <|im_end|> (the default one by kdlab's rule).
      assistant = np.asarray(chat["generation_assistant_masks"], np.float32)
      np.testing.assert_array_equal(mask[:-1], assistant[1:])
      assert mask[-1] == 0


def test_loss_mask_modes():
  from kdlab.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer.from_dir(CHATML[3:])
  where = f"{DATA / 'chats.jsonl'}:5"  # user, "7", user, "11 is prime too."
  runs = {}
  for mode in instruct.LOSS_MASKS:
    tokens, mask = _all_examples(f"jsonl:{DATA / 'chats.jsonl'}", tokenizer=CHATML, seq_len=256, loss_mask=mode)[where]
    targets = tokens[1:][mask[:-1] > 0]
    runs[mode] = tok.decode(targets)
    if mode == "all":
      assert mask.sum() == len(tokens) - 1
  assert runs["completion"] == "7<|im_end|>11 is prime too.<|im_end|>"
  assert runs["last_turn"] == "11 is prime too.<|im_end|>"
  # Plain prompt/completion: "all" counts the prompt too; completion and last_turn are the completion.
  path = f"jsonl:{DATA / 'pairs.jsonl'}"
  for mode, want in (("completion", "3, 4, 5\0"), ("last_turn", "3, 4, 5\0"), ("all", "ount: 1, 2, 3, 4, 5\0")):
    tokens, mask = _all_examples(path, loss_mask=mode)[f"{DATA / 'pairs.jsonl'}:5"]
    assert _counted_text(BYTES, tokens, mask) == want, mode


def test_prompt_completion_through_the_chat_template_or_concatenated():
  from kdlab.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer.from_dir(CHATML[3:])
  where = f"{DATA / 'pairs.jsonl'}:2"
  tokens, mask = _all_examples(f"jsonl:{DATA / 'pairs.jsonl'}", tokenizer=CHATML)[where]  # default: the template
  chat = tok.apply_chat_template([{"role": "user", "content": "Capital of France? "},
                                  {"role": "assistant", "content": "Paris."}])
  assert tokens.tolist() == chat.ids.tolist()
  assert _counted_text(tok, tokens, mask) == "Paris.<|im_end|>"
  tokens, mask = _all_examples(f"jsonl:{DATA / 'pairs.jsonl'}", tokenizer=CHATML, chat_template=False)[where]
  assert tok.decode(tokens) == "Capital of France? Paris.<|im_end|>"  # <|im_end|> is the eos_token
  assert _counted_text(tok, tokens, mask) == "Paris.<|im_end|>"
  # A tokenizer that puts a BOS before plain text gets it here too (never counted).
  other = HFTokenizer.from_dir(OTHER[3:])
  tokens, mask = _all_examples(f"jsonl:{DATA / 'pairs.jsonl'}", tokenizer=OTHER)[where]
  assert tokens[0] == other.bos_id and tokens[-1] == other.eos_id


def test_split_is_deterministic_by_content(tmp_path):
  records = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(200)]
  _write(tmp_path / "a.jsonl", records)
  _write(tmp_path / "b.jsonl", records[::-1])  # the same records in another order
  splits = []
  for name in ("a.jsonl", "b.jsonl"):
    train, val = _load(f"jsonl:{tmp_path / name}", validation_fraction=0.1)
    splits.append(({json.dumps(r.content()) for r in train.examples}, {json.dumps(r.content()) for r in val.examples}))
  assert splits[0] == splits[1]
  assert 8 <= len(splits[0][1]) <= 35  # about 10% of 200
  # Two records: one each side, whatever the fraction.
  _write(tmp_path / "two.jsonl", records[:2])
  for fraction in (0.001, 0.999):
    train, val = _load(f"jsonl:{tmp_path / 'two.jsonl'}", validation_fraction=fraction)
    assert (len(train.examples), len(val.examples)) == (1, 1)


# --- packing -------------------------------------------------------------------------------------

def _reference_first_fit(lengths, seq_len):
  free, rows = [], []
  for n in lengths:
    row = next((r for r, f in enumerate(free) if f >= n), len(free))
    if row == len(free):
      free.append(seq_len)
    free[row] -= n
    rows.append(row)
  return rows


@pytest.mark.parametrize("pack_rows", [True, False])
def test_packing_invariants(pack_rows):
  rng = np.random.default_rng(0)
  seq_len, pad = 16, 99
  lengths = rng.integers(1, seq_len + 1, size=60)
  tokens = [rng.integers(0, 90, size=n).astype(np.int32) for n in lengths]
  masks = [(rng.random(n) < 0.7).astype(np.float32) for n in lengths]
  rows = packing.pack(tokens, masks, seq_len, pad_id=pad, packing=pack_rows)
  if pack_rows:
    assert rows.example_row.tolist() == _reference_first_fit(lengths.tolist(), seq_len)
    assert len(rows) < len(lengths)
  else:
    assert rows.example_row.tolist() == list(range(len(lengths)))
  seen = np.zeros(rows.tokens.shape, int)
  for e, (ids, m) in enumerate(zip(tokens, masks)):
    r, s, n = rows.example_row[e], rows.example_start[e], rows.example_length[e]
    seen[r, s:s + n] += 1
    np.testing.assert_array_equal(rows.tokens[r, s:s + n], ids)
    np.testing.assert_array_equal(rows.targets[r, s:s + n - 1], ids[1:])  # targets stay in the example
    np.testing.assert_array_equal(rows.mask[r, s:s + n], np.append(m[:-1], 0))
    np.testing.assert_array_equal(rows.positions[r, s:s + n], np.arange(n))
    assert len(set(rows.segment_ids[r, s:s + n].tolist())) == 1 and rows.segment_ids[r, s] >= 1
  assert seen.max() == 1  # every example once, no overlap
  padding = seen == 0
  assert (rows.segment_ids[padding] == 0).all() and (rows.positions[padding] == 0).all()
  assert (rows.mask[padding] == 0).all() and (rows.tokens[padding] == pad).all()
  for i in range(len(rows)):
    ids = rows.row_examples(i)
    segs = rows.segment_ids[i][rows.segment_ids[i] > 0]
    assert np.unique(segs).tolist() == list(range(1, len(ids) + 1))  # 1, 2, ... in row order
    assert (np.diff(segs) >= 0).all() and (np.diff(ids) > 0).all()
  # Whatever crosses an example boundary is masked: a counted target always lies in its token's segment.
  counted = rows.mask > 0
  nxt = np.concatenate([rows.segment_ids[:, 1:], np.zeros((len(rows), 1), np.int32)], 1)
  assert (rows.segment_ids[counted] == nxt[counted]).all()
  assert rows.num_tokens == int(sum(m[:-1].sum() for m in masks))


def test_packed_source_batches_carry_segments_and_positions():
  from kdlab.train import tasks
  train, val = _load(f"jsonl:{DATA / 'pairs.jsonl'}", seq_len=64)
  batch = pipeline.gather_text(train, np.arange(len(train)))
  assert {"segment_ids", "positions"} <= set(batch) and batch["segment_ids"].dtype == np.int32
  assert batch["segment_ids"].max() >= 2  # several examples share a row
  abstract = tasks.LANGUAGE_MODEL.abstract_batch(train, 4)
  assert abstract["segment_ids"].shape == abstract["positions"].shape == (4, 64)
  last = list(pipeline.text_eval_batches(val, batch_size=4))[-1]
  assert (last["segment_ids"][~last["mask"]] == 0).all()
  unpacked, _ = _load(f"jsonl:{DATA / 'pairs.jsonl'}", seq_len=64, packing=False)
  assert len(unpacked) == len(unpacked.examples) and unpacked.records.segment_ids.max() == 1
  assert unpacked.records.num_tokens == train.records.num_tokens


# --- long examples and errors --------------------------------------------------------------------

def test_long_examples_are_cut_or_dropped_and_a_long_prompt_is_an_error(tmp_path):
  path = _write(tmp_path / "long.jsonl", [{"prompt": "p" * 10, "completion": "c" * 30}, {"text": "short"},
                                          {"prompt": "q" * 40, "completion": "x"}, {"text": "tiny"}])
  with pytest.raises(UserError) as e:
    _load(f"jsonl:{path}", seq_len=20)
  msg = str(e.value)
  assert f"{path}:3:" in msg and "prompt is 40 tokens" in msg and "config.data.seq_len=20" in msg
  assert "config.data.drop_long=True" in msg and "\n" not in msg
  train, val = _load(f"jsonl:{path}", seq_len=20, drop_long=True)
  assert train.stats["train"]["dropped"] + train.stats["validation"]["dropped"] == 2
  assert sorted(r.where[-1] for r in train.examples + val.examples) == ["2", "4"]
  train, val = _load(f"jsonl:{path}", seq_len=45)  # fits the prompt: the long example is cut at seq_len
  tokens, mask = {w: (t, m) for w, t, m in _examples(train) + _examples(val)}[f"{path}:1"]
  assert BYTES.decode(tokens) == "p" * 10 + "c" * 30 + "\0" and len(tokens) == 41
  assert train.stats["train"]["truncated"] + train.stats["validation"]["truncated"] == 0
  path = _write(tmp_path / "cut.jsonl", [{"prompt": "p" * 10, "completion": "c" * 30}, {"text": "t" * 40}])
  train, val = _load(f"jsonl:{path}", seq_len=25)
  examples = {w: (t, m) for w, t, m in _examples(train) + _examples(val)}
  tokens, mask = examples[f"{path}:1"]
  assert BYTES.decode(tokens) == "p" * 10 + "c" * 15 and _counted_text(BYTES, tokens, mask) == "c" * 15
  assert BYTES.decode(examples[f"{path}:2"][0]) == "t" * 25
  assert train.stats["train"]["truncated"] + train.stats["validation"]["truncated"] == 2


BAD = [
    (["{\"text\": \"ok\"}", "{\"text\": \"fine\"}", "{\"text\": broken"], ":3: malformed JSON"),
    (["{\"text\": \"ok\"}", "{\"question\": \"x\", \"answer\": \"y\"}"], ":2: a record needs 'messages'"),
    (["{\"text\": \"ok\"}", "[1, 2]"], ":2: expected a JSON object"),
    (["{\"text\": \"ok\"}", "", "{\"text\": \"\"}"], ":3: empty content"),
    (["{\"text\": \"ok\"}", "{\"prompt\": \"p\", \"completion\": \"\"}"], ":2: empty content"),
    (["{\"prompt\": \"p\"}", "{\"text\": \"ok\"}"], ":1: has 'prompt' or 'completion' but no 'completion'"),
    (["{\"text\": 3}", "{\"text\": \"ok\"}"], ":1: 'text' must be a string"),
    (["{\"text\": \"ok\"}", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"], ":2: empty content"),
    (["{\"text\": \"ok\"}", "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}, "
      "{\"role\": \"assistant\", \"content\": \"yo\"}]}"], ":2: messages[0] has the unknown role 'robot'"),
]


@pytest.mark.parametrize("lines,message", BAD)
def test_bad_records_name_their_file_and_line(tmp_path, lines, message):
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(UserError) as e:
    _load(f"jsonl:{path}", tokenizer=CHATML)
  assert f"{path}{message}" in str(e.value) and "\n" not in str(e.value)


def test_bad_parquet_rows_and_files_are_named(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", ""]}), path)
  with pytest.raises(UserError, match=f"{path}: row 2: empty content"):
    _load(f"parquet:{path}")
  (tmp_path / "junk.parquet").write_text("not parquet")
  with pytest.raises(UserError, match="junk.parquet: not a readable parquet file"):
    _load(f"parquet:{tmp_path / 'junk.parquet'}")


def test_chats_need_a_chat_template():
  source = f"jsonl:{DATA / 'chats.jsonl'}"
  for tokenizer, chat_template, why in ((OTHER, None, "has no chat template"), ("byte", None, "is the byte tokenizer"),
                                        (CHATML, False, "config.data.chat_template=False")):
    with pytest.raises(UserError) as e:
      _load(source, tokenizer=tokenizer, chat_template=chat_template)
    assert f"chats.jsonl:1: a messages record needs a chat template but config.data.tokenizer='{tokenizer}'" \
        in str(e.value) and why in str(e.value)
  with pytest.raises(UserError, match="config.data.tokenizer=.*has no chat template, which config.data.chat_template"
                     "=True asks for"):
    _load(f"jsonl:{DATA / 'pairs.jsonl'}", tokenizer=OTHER, chat_template=True)
  with pytest.raises(UserError, match=r"config.data.chat_template='nope': .* has no such template; use one of "
                     r"\['default', 'generation'\]"):
    _load(source, tokenizer=CHATML, chat_template="nope")


def test_bad_sources_and_options(tmp_path):
  (tmp_path / "only").mkdir()
  (tmp_path / "only" / "a.txt").write_text("x")
  (tmp_path / "half" / "train").mkdir(parents=True)
  _write(tmp_path / "one.jsonl", [{"text": "alone"}])
  for source, message in ((f"jsonl:{tmp_path / 'nope'}", "does not exist"),
                          (f"jsonl:{tmp_path / 'only'}", "no .jsonl files in"),
                          (f"jsonl:{tmp_path / 'half'}", "has train/ but no validation/"),
                          (f"jsonl:{tmp_path / 'one.jsonl'}", "1 record(s); a train/validation split needs at least 2")):
    with pytest.raises(UserError, match=re.escape(message)):
      _load(source)
  import ml_collections
  for field, value, message in (("loss_mask", "assistant", "config.data.loss_mask='assistant': unknown"),
                                ("packing", 1, "config.data.packing=1: must be True or False"),
                                ("validation_fraction", 1.0, "config.data.validation_fraction=1.0: must be"),
                                ("chat_template", "", "config.data.chat_template='': use None")):
    with pytest.raises(UserError, match=message):
      instruct.options(ml_collections.ConfigDict({field: value}), 32)


def test_cli_refuses_a_malformed_record_before_writing(tmp_path, capsys):
  from kdlab import cli
  path = _write(tmp_path / "bad.jsonl", ["{\"text\": \"ok\"}", "{oops"])
  workdir = tmp_path / "run"
  code = cli.main(["train", f"--config={FIX.parent.parent / 'configs' / 'lm_pysrc.py'}:teacher,quick",
                   f"--workdir={workdir}", f"--config.data.source=jsonl:{path}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == [f"kdlab: error: {path}:2: malformed JSON " + err[0].split("malformed JSON ", 1)[1]]
  assert not workdir.exists()


def test_a_language_model_trains_on_jsonl_chats(tmp_path):
  """The whole path: jsonl records -> packed rows -> the LM task -> a few steps of a tiny gpt."""
  from kdlab.config import load
  from kdlab.train.loop import train
  records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(12) for b in range(12)]
  path = _write(tmp_path / "sums.jsonl", records)
  config = load(f"{FIX.parent.parent / 'configs' / 'lm_pysrc.py'}:teacher,quick")
  config.data.source = f"jsonl:{path}"
  config.train.num_steps = 6
  summary = train(config, tmp_path / "run", use_wandb=False, progress=False)
  assert summary["train_examples"] + summary["val_examples"] == len(records)
  assert summary["dropped_long"] == summary["truncated_examples"] == 0
  assert np.isfinite(summary["val_loss"]) and summary["val_tokens"] > 0
