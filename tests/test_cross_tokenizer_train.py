"""Cross-tokenizer distillation through ``kdlab train``: the teacher reads the text tokenized its own way
(``config.data.teacher_tokenizer``) and the ``uld`` / ``aligned_kd`` terms train the student."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kdlab import cli, models
from kdlab.data import instruct
from kdlab.models.pretrained import from_pretrained, save_pretrained

from conftest import ROOT, read_jsonl

XTOK = ROOT / "tests" / "fixtures" / "xtok"
PAIRS = ROOT / "tests" / "fixtures" / "instruct" / "pairs.jsonl"
CONFIG = str(ROOT / "configs" / "lm_instruct.py")
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """A teacher with the large fixture tokenizer (vocab 500), a student with the small one (300)."""
  root = tmp_path_factory.mktemp("xtok_models")
  teacher = save_pretrained(models.create("llama", vocab_size=500, seed=0, **TINY), root / "teacher",
                            tokenizer_from=XTOK / "large")
  student = save_pretrained(models.create("llama", vocab_size=300, seed=1, **TINY), root / "student",
                            tokenizer_from=XTOK / "small")
  return teacher, student


def _train(workdir, teacher, student, objective, *extra):
  return cli.main(["train", f"--config={CONFIG}:kd,quick,teacher={teacher},student={student},data=jsonl:{PAIRS},"
                   f"seq_len=64,steps=3", f"--workdir={workdir}", "--nowandb", "--no-progress",
                   f"--config.data.tokenizer=hf:{student}", f"--config.data.teacher_tokenizer=hf:{teacher}",
                   "--config.data.packing=False", f"--config.objective={objective}", *extra])


def test_uld_and_aligned_kd_train_a_student_of_another_tokenizer(pair, tmp_path):
  teacher, student = pair
  objective = ("[{'loss': 'ce', 'weight': 0.5}, {'loss': 'aligned_kd', 'weight': 0.25}, "
               "{'loss': 'uld', 'weight': 0.25}]")
  assert _train(tmp_path / "run", teacher, student, objective) == 0
  lines = [l for l in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in l]
  assert [l["step"] for l in lines] == [1, 2, 3]
  for l in lines:
    assert np.isfinite(l["loss"]) and l["distill/uld"] > 0 and l["distill/aligned_kd"] > 0
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  # the teacher's own loss is per its own token; no token-by-token agreement with the student
  assert np.isfinite(summary["val_loss"]) and summary.get("kl_teacher") is None
  # ... computed on the teacher's own tokenization of the validation examples
  _, val = instruct.load(f"jsonl:{PAIRS}", instruct.Options(
      tokenizer=f"hf:{student}", seq_len=64, packing=False, teacher_tokenizer=f"hf:{teacher}"))
  rows = [val.records[i] for i in range(len(val.records))]
  tokens, targets, mask = (np.stack([r[k] for r in rows]) for k in
                           ("teacher_tokens", "teacher_targets", "teacher_token_mask"))
  log_p = jax.nn.log_softmax(from_pretrained(teacher)(tokens, train=False)[0])
  nll = -np.take_along_axis(np.asarray(log_p), targets[..., None], -1)[..., 0]
  assert summary["teacher_val_loss"] == pytest.approx(float((nll * mask).sum() / mask.sum()), rel=1e-5)


def test_cross_tokenizer_refuses_packing_and_on_policy(pair, tmp_path, capsys):
  teacher, student = pair
  objective = "[{'loss': 'ce', 'weight': 0.5}, {'loss': 'uld', 'weight': 0.5}]"
  for extra, message in (([], ""), (["--config.on_policy={'fraction': 1.0, 'max_new_tokens': 4}"],
                                    "config.on_policy: the student's samples have no teacher tokenization")):
    workdir = tmp_path / f"bad{len(extra)}"
    args = ["train", f"--config={CONFIG}:kd,quick,teacher={teacher},student={student},data=jsonl:{PAIRS},"
            f"seq_len=64", f"--workdir={workdir}", "--nowandb", "--no-progress",
            f"--config.data.tokenizer=hf:{student}", f"--config.data.teacher_tokenizer=hf:{teacher}",
            f"--config.objective={objective}", *extra]
    if extra:
      args.append("--config.data.packing=False")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not workdir.exists()
    assert (message or "config.data.packing=True: cross-tokenizer") in err
