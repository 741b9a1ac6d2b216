"""paper_repro/llm_distill: the stdlib instruction-data builder, its tokenizers, ROUGE-L, and the runner's
``--quick`` path (a teacher, a same-tokenizer and a cross-tokenizer student, exported and evaluated)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import textwrap

import pytest

from conftest import ROOT

HERE = ROOT / "paper_repro" / "llm_distill"


def _module(name: str):
  sys.path.insert(0, str(HERE))
  spec = importlib.util.spec_from_file_location(f"llm_distill_{name}", HERE / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build_data = _module("build_data")
run = _module("run")

SOURCE = textwrap.dedent('''\
    def documented(a, b=1):
        """Add them.

        Twice, really.
        """
        total = a + b
        return total + total

    def undocumented(x):
        return x

    def stub(self):
        """Not yet."""
        pass

    class Box:
        def get(self, key):
            """The value of key."""
            value = self.items[key]
            return value

        def one_liner(self):
            """Only a docstring."""
    ''')


def test_records_are_signature_and_docstring_then_the_body():
  records = build_data.records_of(SOURCE, "mod", max_prompt=200, max_completion=200)
  assert [r["name"] for r in records] == ["mod.documented", "mod.Box.get"]
  assert records[0]["prompt"] == 'def documented(a, b=1):\n    """Add them.\n\n    Twice, really.\n    """\n'
  assert records[0]["completion"] == "    total = a + b\n    return total + total\n"
  # A method is dedented to its def; the body keeps its indentation relative to it.
  assert records[1]["prompt"] == 'def get(self, key):\n    """The value of key."""\n'
  assert records[1]["completion"] == "    value = self.items[key]\n    return value\n"
  assert build_data.records_of(SOURCE, "mod", max_prompt=50, max_completion=200) == records[1:]
  assert build_data.records_of("def broken(:\n", "mod", max_prompt=200, max_completion=200) == []


def test_split_is_a_stable_hash_of_the_name():
  names = [f"m.f{i}" for i in range(2000)]
  held = [n for n in names if build_data.is_validation(n, 0.05)]
  assert held == [n for n in names if build_data.is_validation(n, 0.05)]
  assert 50 <= len(held) <= 150


def test_tokenizers_round_trip_and_name_their_special_tokens(tmp_path):
  from kdlab.data import hf_tokenizer
  texts = [SOURCE] * 4 + ["x = 12345\nprint(x)\n"]
  for style, vocab in (("bytelevel", 300), ("metaspace", 120)):
    out = build_data.train_tokenizer(texts, tmp_path / style, vocab_size=vocab, style=style)
    tok = hf_tokenizer.load(f"hf:{out}")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode(SOURCE, add_special_tokens=False)
    assert tok.decode(ids) == SOURCE and ids[0] != tok.bos_id and tok.vocab_size <= vocab
  with pytest.raises(ValueError, match="style="):
    build_data.train_tokenizer(texts, tmp_path / "x", vocab_size=100, style="wordpiece")


def test_rouge_l():
  assert run.words("return a+b  # c") == ["return", "a", "+", "b", "#", "c"]
  assert run.rouge_l("return x", "return x") == 1.0
  assert run.rouge_l("pass", "return x") == 0.0
  assert run.rouge_l("", "") == 1.0 and run.rouge_l("", "x") == 0.0
  # LCS of (a b c d) and (a c e d) is a c d: P = R = 3/4.
  assert run.rouge_l("a b c d", "a c e d") == pytest.approx(0.75)
  # P = 2/2, R = 2/4: F1 = 2/3.
  assert run.rouge_l("a d", "a b c d") == pytest.approx(2 / 3)


def test_quick_runner_trains_exports_and_reports(tmp_path):
  out = tmp_path / "results.md"
  assert run.main(["--quick", "--workdir", str(tmp_path / "w"), "--methods", "kd,xtok", "--out", str(out)]) == 0
  text = out.read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
  assert set(rows) >= {"teacher (CE)", run.LABELS["kd"], run.LABELS["xtok"]}
  for label in (run.LABELS["kd"], run.LABELS["xtok"]):
    cells = rows[label].split(" | ")
    assert cells[1] == "1" and float(cells[2]) >= 0.0 and float(cells[3]) > 0.0
  for method in ("kd", "xtok"):
    exported = tmp_path / "w" / "export" / method / "seed0"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    result = json.loads((tmp_path / "w" / method / "eval.json").read_text())
    assert 0.0 <= result["rouge_l"] <= 100.0 and result["val_nll"] > 0
  assert json.loads((tmp_path / "w" / "xtok" / "config.json").read_text())["model"]["vocab_size"] == 1536
  assert json.loads((tmp_path / "w" / "kd" / "eval.json").read_text())["kl_teacher"] > 0
