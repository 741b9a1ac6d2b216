"""On-policy distillation and sequence-level KD on chat data with the pretrained families: the prompts are
the chat template's generation prompts, replies stop at the end-of-turn token, ``kdlab train`` on-policy
and ``kdlab generate-data`` + training on its rows, and a prompt too long for ``seq_len``."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdlab import cli
from kdlab.data import hf_tokenizer, instruct, prompts as promptlib
from kdlab.data.generated import open_generated
from kdlab.errors import UserError
from kdlab.models import registry
from kdlab.sampling import generate
from kdlab.train import on_policy
from kdlab.train.state import Learner, split_learner

from conftest import ROOT, read_jsonl

LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"  # vocab 400, the ChatML test tokenizer
TOKENIZER = f"hf:{LLAMA}"
CHATS = ROOT / "tests" / "fixtures" / "instruct" / "chats.jsonl"
CONFIG = str(ROOT / "configs" / "lm_instruct.py")
ARGS = ["--nowandb", "--no-progress"]
SHORT = [  # short chats: tiny prompts for the tiny models
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a?"},
                  {"role": "assistant", "content": "b"}]},
    {"prompt": "2+2", "completion": "4"},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                  {"role": "user", "content": "z"}, {"role": "assistant", "content": "w!"}]},
    {"prompt": "name", "completion": "kd"},
    {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
]


def _generation_prompt(tok, record: instruct.Record) -> np.ndarray:
  """The chat template's rendering of the conversation up to its last assistant message, with the
  generation prompt (what a chat model is sampled after)."""
  messages = list(record.messages) if record.messages is not None else [{"role": "user", "content": record.prompt}]
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if record.messages is not None else 1
  return tok.apply_chat_template(messages[:last], add_generation_prompt=True).ids


@pytest.fixture(scope="module")
def short_chats(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("chat") / "short.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in SHORT))
  return path


def test_prompts_are_the_chat_templates_generation_prompts():
  tok = hf_tokenizer.load(TOKENIZER)
  for loss_mask in ("completion", "last_turn"):
    train, _ = instruct.load(f"jsonl:{CHATS}", instruct.Options(tokenizer=TOKENIZER, seq_len=256, loss_mask=loss_mask))
    found = promptlib.find(train, max_new_tokens=8, field="config.on_policy", loss_mask=loss_mask)
    rows = found.tokens(train.records.tokens, pad_id=-1)
    assert len(found.length) == len(train.examples) == 5
    for e, record in enumerate(train.examples):
      expected = _generation_prompt(tok, record)
      np.testing.assert_array_equal(rows[e, :found.length[e]], expected, err_msg=record.where)
      assert (rows[e, found.length[e]:] == -1).all()
      # ... and the encoded example (kdlab.data.instruct) goes on with the last assistant turn's counted tokens.
      ids, counted = instruct.Encoder(tok, "t", "last_turn", None).encode(record)
      assert int(np.argmax(counted)) == found.length[e] and (ids[:found.length[e]] == expected).all()
  stop_ids, pad_id = promptlib.stop_tokens(ml_collections.ConfigDict(dict(tokenizer=TOKENIZER)))
  assert stop_ids == (tok.token_id("eos_token"),) and tok.decode(stop_ids) == "<|im_end|>"
  assert tok.decode([pad_id]) == "<|endoftext|>" and pad_id != stop_ids[0]
  with pytest.raises(UserError, match=r"pairs.jsonl:3: a text record has no prompt"):
    pairs = f"jsonl:{CHATS.parent / 'pairs.jsonl'}"
    train, _ = instruct.load(pairs, instruct.Options(tokenizer=TOKENIZER, seq_len=256))
    promptlib.find(train, max_new_tokens=8, field="config.on_policy")


FAMILIES = {
    "llama": dict(num_key_value_heads=1),
    "qwen2": dict(num_key_value_heads=1),
    "qwen3": dict(num_key_value_heads=1, head_dim=8),
    "gemma3": dict(num_key_value_heads=1, head_dim=8, sliding_window=4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rollout_on_chat_data_masks_the_reply_up_to_its_stop_token(family, short_chats):
  seq_len, new = 96, 6
  train, _ = instruct.load(f"jsonl:{short_chats}", instruct.Options(tokenizer=TOKENIZER, seq_len=seq_len))
  student = registry.create(family, seed=0, vocab_size=400, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, max_len=seq_len, **FAMILIES[family])
  learner = Learner(student, {})
  graphdef, params, rest = split_learner(learner)
  found = promptlib.find(train, max_new_tokens=new, field="config.on_policy")
  # Many stop ids so that most rows stop early; the tokenizer's pad id pads.
  spec = on_policy.OnPolicy(fraction=1.0, max_new_tokens=new, temperature=1.0, prompt_len=found.width, seq_len=seq_len,
                            examples=True, stop_ids=tuple(range(0, 400, 5)), pad_id=0)
  table = tuple(jnp.asarray(t) for t in found.row_table(len(train)))
  rows = np.arange(len(train))
  batch = {k: jnp.asarray(v) for k, v in {
      "tokens": train.records.tokens[rows], "targets": train.records.targets[rows],
      "token_mask": train.records.mask[rows], "segment_ids": train.records.segment_ids[rows],
      "positions": train.records.positions[rows], "index": rows.astype(np.int32),
      "mask": np.ones(len(rows), bool)}.items()}
  key = on_policy.rollout_key(jnp.int32(3), jnp.int32(5))
  out = jax.jit(lambda p, r, b, k: on_policy.rollout(graphdef, p, r, b, k, spec=spec, table=table))(
      params, rest, batch, key)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
  # The prompts are the chosen examples' prompts; the samples are the student's own (generate() on them).
  prompts, lengths = on_policy.batch_prompts(batch, table, key, spec=spec)
  chosen = [int(np.flatnonzero((found.example_row == r) & (found.example_start == s))[0]) for r, s in zip(
      rows, np.asarray(table[0])[rows, np.asarray(jax.random.randint(
          jax.random.fold_in(key, on_policy.CHOICE), rows.shape, 0, table[2][rows]))])]
  expected_prompts = found.tokens(train.records.tokens, 0)[chosen]
  np.testing.assert_array_equal(prompts, expected_prompts)
  tokens, mask = np.asarray(out["tokens"]), np.asarray(out["token_mask"])
  if family == "llama":  # the replies are the student's own samples (one family is enough: generate() compiles)
    samples = np.asarray(generate(student, prompts, prompt_lengths=lengths, max_new_tokens=new, temperature=1.0,
                                  key=key, pad_id=0).tokens)
  stops = 0
  for b, n in enumerate(np.asarray(lengths)):
    np.testing.assert_array_equal(tokens[b, :n], expected_prompts[b, :n])
    sampled = samples[b, n:n + new] if family == "llama" else tokens[b, n:n + new]
    hit = [i for i, t in enumerate(sampled) if t % 5 == 0]
    kept = hit[0] + 1 if hit else new  # the reply up to and including its first stop token
    stops += bool(hit)
    np.testing.assert_array_equal(tokens[b, n:n + kept], sampled[:kept])
    assert (tokens[b, n + kept:] == 0).all()  # then padding, never the rest of the sample
    expected_mask = np.zeros(seq_len, np.float32)
    expected_mask[n - 1:n - 1 + kept] = 1.0  # targets that are reply tokens, the stop token included
    np.testing.assert_array_equal(mask[b], expected_mask)
    np.testing.assert_array_equal(out["segment_ids"][b], (np.arange(seq_len) < n + kept).astype(np.int32))
    np.testing.assert_array_equal(out["positions"][b], np.where(np.arange(seq_len) < n + kept, np.arange(seq_len), 0))
    np.testing.assert_array_equal(out["targets"][b, :-1], tokens[b, 1:])
  assert stops >= 1


def _train(workdir, variant, data, *options, overrides=()):
  """A fresh one-block llama student of the fixture teacher (not the teacher itself: their KL is not 0)."""
  spec = ",".join([variant, "quick", f"teacher={LLAMA}", "layers=1", f"data=jsonl:{data}", "seq_len=96",
                   "new=6", *options])
  return cli.main(["train", f"--config={CONFIG}:{spec}", f"--workdir={workdir}", *ARGS, *overrides])


def test_onpolicy_train_on_chat_data_from_a_pretrained_llama(short_chats, tmp_path):
  workdir = tmp_path / "run"
  assert _train(workdir, "onpolicy", short_chats, "steps=3") == 0
  lines = [l for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert all(l["on_policy/fraction"] == 1.0 and np.isfinite(l["loss"]) and l["distill/kd"] > 0 for l in lines)


def test_generate_data_on_chat_data_and_training_on_it(short_chats, tmp_path, capsys):
  out = tmp_path / "gen"
  spec = f"seqkd,quick,teacher={LLAMA},student={LLAMA},data=jsonl:{short_chats},seq_len=96,new=6,gen={out}"
  assert cli.main(["generate-data", f"--config={CONFIG}:{spec}", f"--out={out}", "--no-progress"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["segments"] and meta["stop_ids"] == [2] and meta["pad_id"] == 0
  train, _ = instruct.load(f"jsonl:{short_chats}", instruct.Options(tokenizer=TOKENIZER, seq_len=96))
  found = promptlib.find(train, max_new_tokens=6, field="config.generate_data")
  rows, _ = open_generated(f"generated:{out}", seq_len=96)
  assert len(rows) == len(train.examples) == meta["num_sequences"]
  prompts = found.tokens(train.records.tokens, 0)
  for e, n in enumerate(found.length):  # prompt, then the teacher's reply up to its stop token, then padding
    np.testing.assert_array_equal(rows.tokens[e, :n], prompts[e, :n])
    reply = np.flatnonzero(rows.mask[e]) + 1
    assert len(reply) >= 1 and reply[0] == n and (np.diff(reply) == 1).all()
    end = reply[-1] + 1
    assert len(reply) == 6 or rows.tokens[e, reply[-1]] == 2  # all tokens sampled, or stopped at <|im_end|>
    assert (rows.tokens[e, end:] == 0).all() and (rows.segment_ids[e] == (np.arange(96) < end)).all()
  assert meta["generated_tokens"] == int(rows.mask.sum())
  # Training on it: the validation split is the chat data's own.
  workdir = tmp_path / "seqkd"
  code = cli.main(["train", f"--config={CONFIG}:{spec},steps=2", f"--workdir={workdir}", *ARGS])
  assert code == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 2 and np.isfinite(summary["val_loss"])


@pytest.mark.parametrize("command", ["train", "generate-data"])
def test_a_prompt_too_long_for_seq_len_is_one_line_naming_the_record(command, short_chats, tmp_path, capsys):
  target = tmp_path / "out"
  variant = "onpolicy" if command == "train" else f"seqkd,gen={target}"
  spec = f"{variant},quick,teacher={LLAMA},student={LLAMA},data=jsonl:{short_chats},seq_len=96,new=40"
  flag = "--workdir" if command == "train" else "--out"
  code = cli.main([command, f"--config={CONFIG}:{spec}", f"{flag}={target}", *ARGS[1:]])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and not target.exists()
  field = "config.on_policy" if command == "train" else "config.generate_data"
  assert f"short.jsonl:" in err and f"which leaves fewer than {field}.max_new_tokens=40" in err
