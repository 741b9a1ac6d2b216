"""The instruction data and tokenizers of the LLM distillation runner, built from this interpreter's stdlib.

  python paper_repro/llm_distill/build_data.py --out DIR [--max-train N] [--max-validation N] [--vocab V]

Records: every function or method with a docstring in the standard library's ``.py`` files (tests,
``idlelib``, ``lib2to3``, ``site-packages`` and ``__pycache__`` left out), as
``{"prompt": signature + docstring, "completion": body}``: the source lines from the ``def`` (its
decorators left out) to the end of the docstring, dedented, then the rest of the function, dedented
the same way and ending with a newline. Functions whose prompt or body is longer than the caps (in
characters) or whose body is a single ``pass`` / ``...`` / ``raise NotImplementedError`` are skipped.
The split is by a stable hash of ``MODULE.QUALNAME`` (about 5% to validation), and the records keep
file order, so the same interpreter always gives the same files: ``DIR/data/train/stdlib.jsonl`` and
``DIR/data/validation/stdlib.jsonl`` (``config.data.source = "jsonl:DIR/data"``).

Tokenizers (``tokenizers`` BPE trained on the train split's prompts and completions, Hugging Face
directories that :class:`kdlab.data.hf_tokenizer.HFTokenizer` and ``transformers`` read, special
tokens ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, no BOS added, EOS ``</s>``):

* ``DIR/tok_main``: byte-level pre-tokenizer (GPT-2 style), ``vocab`` ids: the teacher's and the
  same-tokenizer students';
* ``DIR/tok_alt``: Metaspace pre-tokenizer (SentencePiece style, spaces as a visible character) with
  digits split, ``vocab_alt`` ids: the cross-tokenizer student's.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import pathlib
import sysconfig
from typing import Iterator

SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo")
SPECIALS = ("<pad>", "<s>", "</s>")
TRIVIAL = ("pass", "...", "raise NotImplementedError", "raise NotImplementedError()")


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
  """The standard library's ``.py`` files, sorted by relative path (tests and tools left out)."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(SKIP_DIRS)]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield prefix + node.name, node
      yield from _functions(node, prefix + node.name + ".")
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node, prefix + node.name + ".")


def records_of(source: str, module: str, *, max_prompt: int, max_completion: int) -> list[dict[str, str]]:
  """``[{"prompt", "completion", "name"}]`` of the documented functions of one module's ``source``."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.splitlines()
  out = []
  for qualname, node in _functions(tree):
    body = node.body
    if len(body) < 2 or ast.get_docstring(node, clean=False) is None:
      continue
    doc_end, first = body[0].end_lineno, body[1].lineno
    if lines[first - 1][:body[1].col_offset].strip():  # body on the docstring's line: no clean cut
      continue
    head = lines[node.lineno - 1:doc_end]
    rest = lines[doc_end:node.end_lineno]
    indent = len(head[0]) - len(head[0].lstrip())
    if any(l.strip() and len(l) - len(l.lstrip()) < indent for l in head + rest):
      continue
    prompt = "\n".join(l[indent:] for l in head) + "\n"
    # The body keeps its indentation relative to the def, as the prompt's docstring does.
    completion = "\n".join(l[indent:] for l in rest).strip("\n") + "\n"
    if completion.strip() in TRIVIAL or "\t" in prompt + completion:
      continue
    if len(prompt) > max_prompt or len(completion) > max_completion or len(completion.strip()) < 8:
      continue
    out.append({"prompt": prompt, "completion": completion, "name": f"{module}.{qualname}"})
  return out


def is_validation(name: str, fraction: float) -> bool:
  """Whether the record of ``name`` (``MODULE.QUALNAME``) is held out: md5 of the name below ``fraction``."""
  return int(hashlib.md5(name.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def build_records(*, max_prompt: int = 200, max_completion: int = 200, validation_fraction: float = 0.05,
                  root: pathlib.Path | None = None) -> tuple[list[dict], list[dict]]:
  """(train, validation) records of the whole standard library, in file order."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  train, val = [], []
  seen = set()
  for path in stdlib_files(root):
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    try:
      source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    for r in records_of(source, module, max_prompt=max_prompt, max_completion=max_completion):
      key = (r["prompt"], r["completion"])
      if key in seen:  # a function copied between modules: one copy, so no validation record is in train
        continue
      seen.add(key)
      (val if is_validation(r["name"], validation_fraction) else train).append(r)
  return train, val


def train_tokenizer(texts: list[str], out: pathlib.Path, *, vocab_size: int, style: str) -> pathlib.Path:
  """A BPE tokenizer trained on ``texts``, saved as a Hugging Face directory ``out``.

  ``style``: ``"bytelevel"`` (GPT-2's byte-level pre-tokenizer and decoder) or ``"metaspace"``
  (spaces replaced by ``▁``, digits split one by one, a byte-fallback-free character alphabet).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if style == "bytelevel":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  elif style == "metaspace":
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Metaspace(prepend_scheme="never")])
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = sorted(set("".join(texts)) | {"▁"})
  else:
    raise ValueError(f"style={style!r}: use 'bytelevel' or 'metaspace'")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
      "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 20,
      "clean_up_tokenization_spaces": False},
      indent=2) + "\n")
  return out


def _write(records: list[dict], path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in records))


def build(out: str | pathlib.Path, *, max_train: int | None = None, max_validation: int | None = None,
          vocab: int = 2048, vocab_alt: int = 1536, max_prompt: int = 200, max_completion: int = 200,
          root: pathlib.Path | None = None) -> dict:
  """Writes the splits and both tokenizers under ``out`` (reused when ``out/meta.json`` says the same);
  returns the meta: record counts, characters, caps and the Python version the records come from."""
  import platform
  out = pathlib.Path(out)
  want = dict(max_train=max_train, max_validation=max_validation, vocab=vocab, vocab_alt=vocab_alt,
              max_prompt=max_prompt, max_completion=max_completion, python=platform.python_version())
  meta_path = out / "meta.json"
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if {k: meta.get(k) for k in want} == want:
      return meta
  train, val = build_records(max_prompt=max_prompt, max_completion=max_completion, root=root)
  total_train, total_val = len(train), len(val)
  if max_train is not None:  # an even spread over the library, not its first modules
    train = [train[i] for i in sorted({int(j * len(train) / max_train) for j in range(min(max_train, len(train)))})]
  if max_validation is not None:
    val = [val[i] for i in sorted({int(j * len(val) / max_validation) for j in range(min(max_validation, len(val)))})]
  _write(train, out / "data" / "train" / "stdlib.jsonl")
  _write(val, out / "data" / "validation" / "stdlib.jsonl")
  texts = [r["prompt"] + r["completion"] for r in train]
  train_tokenizer(texts, out / "tok_main", vocab_size=vocab, style="bytelevel")
  train_tokenizer(texts, out / "tok_alt", vocab_size=vocab_alt, style="metaspace")
  meta = dict(want, train=len(train), validation=len(val), library_train=total_train, library_validation=total_val,
              train_chars=sum(map(len, texts)))
  meta_path.write_text(json.dumps(meta, indent=2) + "\n")
  return meta


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--max-train", type=int, default=None)
  parser.add_argument("--max-validation", type=int, default=None)
  parser.add_argument("--vocab", type=int, default=2048)
  parser.add_argument("--vocab-alt", type=int, default=1536)
  args = parser.parse_args(argv)
  print(json.dumps(build(args.out, max_train=args.max_train, max_validation=args.max_validation, vocab=args.vocab,
                         vocab_alt=args.vocab_alt), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
