"""Byte-level BPE tokenizers trained on Python standard-library modules, for the fixture tools.

``tools/make_tokenizer_fixtures.py`` and ``tools/make_xtok_fixtures.py`` build their tokenizers here,
so the test fixtures differ only in the choices named by the arguments.
"""

from __future__ import annotations

import pathlib
import sysconfig

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Letters with an optional leading non-letter, single digits, punctuation runs, newlines, spaces (as Qwen2.5).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def stdlib_text(names: list[str]) -> list[str]:
  """The text of these standard-library modules (paths relative to the stdlib folder)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return [(root / n).read_text(encoding="utf-8") for n in names]


def train(modules: list[str], vocab_size: int, special_tokens: list[str], *, qwen_split: bool,
          prefix_space: bool = False, trim_offsets: bool = False) -> Tokenizer:
  """A byte-level BPE of ``vocab_size`` trained on ``modules``.

  ``qwen_split``: NFC, then :data:`QWEN_SPLIT` before the byte mapping; otherwise the GPT-2 split
  (with a space added before the text when ``prefix_space``).
  """
  tok = Tokenizer(models.BPE())
  if qwen_split:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
  tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(stdlib_text(modules), trainer)
  return tok
