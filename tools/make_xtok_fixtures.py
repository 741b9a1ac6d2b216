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

import stdlib_bpe
from tokenizers import Tokenizer

def train_small() -> Tokenizer:
  return stdlib_bpe.train(["textwrap.py", "string.py"], 300, ["<|endoftext|>"], qwen_split=True)


def train_large() -> Tokenizer:
  return stdlib_bpe.train(["heapq.py", "bisect.py", "fnmatch.py"], 500, ["<pad>", "<s>", "</s>"], qwen_split=False)


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
