"""Byte tokenizer, packing, and the pysrc source."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from kdlab.data import text

from conftest import ROOT, child_env


def test_tokenizer_round_trips():
  tok = text.ByteTokenizer()
  for s in ["", "def f(x):\n    return x  # ok\n", "héllo wörld ✓ 日本"]:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < tok.vocab_size
    assert tok.decode(ids) == s
  assert len(tok.encode("é")) == 2  # bytes, not characters
  with pytest.raises(ValueError, match="255"):
    tok.decode([300])


def test_pack_shift_mask_and_boundaries():
  docs = [np.array([1, 2, 3]), np.array([4, 5])]
  p = text.pack(docs, seq_len=4)
  # stream: 1 2 3 EOD 4 5 EOD -> 6 targets -> 2 windows, the last one padded
  np.testing.assert_array_equal(p.tokens, [[1, 2, 3, 0], [4, 5, 0, 0]])
  np.testing.assert_array_equal(p.targets, [[2, 3, 0, 4], [5, 0, 0, 0]])
  np.testing.assert_array_equal(p.mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(p.tokens[1:, 0], p.targets[:-1, -1])  # windows overlap by one
  assert p.num_tokens == 6
  item = p[1]
  assert set(item) == {"tokens", "targets", "mask"} and item["tokens"].dtype == np.int32
  assert item["mask"].dtype == np.float32


_SPLIT = ("import json, sys\nfrom kdlab.data import text\n"
          "files = text.pysrc_files(sys.argv[1] if len(sys.argv) > 1 else None)\n"
          "print(json.dumps([f for f in files if text.is_validation(f)]))")


def _validation_files_in_a_child(*args: str, hash_seed: str) -> list[str]:
  proc = subprocess.run([sys.executable, "-c", _SPLIT, *args], env=dict(child_env(), PYTHONHASHSEED=hash_seed),
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


def test_pysrc_split_is_the_same_in_every_process_and_under_any_root(tmp_path):
  """Other processes (other string-hash seeds) and a copy of some files under another root give the
  same validation files: the split depends on the file's relative path alone."""
  files = text.pysrc_files()
  assert len(files) > 100 and files == sorted(files)
  assert not any("site-packages" in f or "/test/" in f"/{f}" for f in files)
  val = [f for f in files if text.is_validation(f)]
  assert 0.02 < len(val) / len(files) < 0.1
  assert _validation_files_in_a_child(hash_seed="1") == _validation_files_in_a_child(hash_seed="2") == val
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  subset = val[:5] + [f for f in files if f not in val][:20]
  for f in subset:
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(stdlib / f, tmp_path / f)
  assert text.pysrc_files(str(tmp_path)) == sorted(subset)
  assert _validation_files_in_a_child(str(tmp_path), hash_seed="3") == sorted(val[:5])


def test_pysrc_packs_limited_text():
  train = text.pysrc("train", seq_len=16, max_bytes=4096)
  again = text.pysrc("train", seq_len=16, max_bytes=4096)
  val = text.pysrc("validation", seq_len=16, max_bytes=4096)
  np.testing.assert_array_equal(train.tokens, again.tokens)
  assert train.tokens.shape[1] == 16 and train.tokens.dtype == np.int32
  assert 4096 <= train.num_tokens < 4096 + 64  # bytes read plus one EOD per file
  assert not np.array_equal(train.tokens[:4], val.tokens[:4])
  assert "import" in text.ByteTokenizer().decode(train.tokens.reshape(-1)) or "def" in \
      text.ByteTokenizer().decode(train.tokens.reshape(-1))
  with pytest.raises(ValueError, match="split"):
    text.pysrc("test")


def test_usable_as_grain_source():
  grain = pytest.importorskip("grain")
  data = text.pysrc("validation", seq_len=8, max_bytes=1024)
  ds = grain.MapDataset.source(data).shuffle(seed=0).batch(4)
  batch = ds[0]
  assert batch["tokens"].shape == (4, 8) and batch["mask"].shape == (4, 8)
