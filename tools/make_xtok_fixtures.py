"""Writes the two tokenizers of tests/test_cross_tokenizer.py: same text, different vocabularies.

Run once (the output is committed; tests only read it):

  .venv/bin/python tools/make_xtok_fixtures.py [--out tests/fixtures/xtok]

Both are byte-level BPE tokenizers trained with ``tokenizers`` on Python standard-library modules, saved
as Hugging Face tokenizer folders (``tokenizer.json`` and ``tokenizer_config.json``) that
:meth:`kdlab.data.hf_tokenizer.HFTokenizer.from_dir` reads:

* ``small/``: vocab 300, a Qwen2.5-like split (letters with an optional leading non-letter, single
  digits), ``<|endoftext|>`` as its end-of-text and padding token, trained on ``textwrap.py`` and
  ``string.py``;
* ``large/``: vocab 500, the GPT-2 split (no prefix space), ``<s>`` / ``</s>`` / ``<pad>``, trained on
  ``heapq.py``, ``bisect.py`` and ``fnmatch.py``.

Different merges and sizes make their token boundaries differ on most words, which is what the
cross-tokenizer alignment and losses are tested on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sysconfig

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _stdlib_text(names: list[str]) -> list[str]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return [(root / n).read_text(encoding="utf-8") for n in names]


def train_small() -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_stdlib_text(["textwrap.py", "string.py"]), trainer)
  return tok


def train_large() -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_stdlib_text(["heapq.py", "bisect.py", "fnmatch.py"]), trainer)
  return tok


def save(tok: Tokenizer, folder: pathlib.Path, config: dict) -> None:
  folder.mkdir(parents=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures/xtok")
  out = pathlib.Path(parser.parse_args().out)
  if out.exists():
    shutil.rmtree(out)
  save(train_small(), out / "small", {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
  save(train_large(), out / "large", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
  print(f"wrote {sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())}")


if __name__ == "__main__":
  main()
