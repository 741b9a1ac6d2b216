"""Seeds in one compiled program: a vmapped run equals the separate runs, seed by seed."""

import json

import numpy as np

from kdlab.config import load
from kdlab.train.loop import train

from conftest import HINTON, read_jsonl


def test_vmapped_seeds_equal_separate_runs(tmp_path):
  config = load(f"{HINTON}:teacher,source=digits,quick")  # dropout: every seed has its own RNG stream
  config.seed, config.vmap_seeds = 4, 2
  group = train(config, tmp_path / "vmapped", use_wandb=False, progress=False)
  assert group["seeds"] == [4, 5]
  for k, run in zip(group["seeds"], group["runs"]):
    single = load(f"{HINTON}:teacher,source=digits,quick")
    single.seed = k
    alone = train(single, tmp_path / f"alone{k}", use_wandb=False, progress=False)
    assert run["test_errors"] == alone["test_errors"]
    np.testing.assert_allclose(run["test_ce"], alone["test_ce"], rtol=1e-5)
    seed_dir = tmp_path / "vmapped" / f"seed{k}"
    assert json.loads((seed_dir / "config.json").read_text())["seed"] == k
    vm = [l["loss"] for l in read_jsonl(seed_dir / "metrics.jsonl") if "loss" in l]
    sep = [l["loss"] for l in read_jsonl(tmp_path / f"alone{k}" / "metrics.jsonl") if "loss" in l]
    np.testing.assert_allclose(vm, sep, rtol=1e-5)
  assert group["runs"][0]["test_ce"] != group["runs"][1]["test_ce"]  # the seeds really differ
