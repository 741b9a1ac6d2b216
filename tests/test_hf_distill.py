"""Distilling a pretrained Hugging Face teacher (a golden fixture) into a smaller llama through
``kdlab train``, exporting the student with ``kdlab export``, and every way to start a student."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from kdlab import cli
from kdlab import config as kconfig
from kdlab.models import from_pretrained

from conftest import ROOT, checkpoint_contents, read_jsonl

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
TEACHER = FIXTURES / "llama"  # vocab 400 (the ChatML test tokenizer), 2 layers
HF = str(ROOT / "configs" / "lm_hf.py")
ARGS = ["--nowandb", "--no-progress"]


def _train(workdir, variant: str, *options: str, overrides=()) -> int:
  spec = ",".join([variant, "quick", f"teacher={TEACHER}", *options])
  return cli.main(["train", f"--config={HF}:{spec}", f"--workdir={workdir}", *ARGS, *overrides])


@pytest.mark.parametrize("variant", ["kd", "reverse_kl", "jsd", "kd,impl=fused"])
def test_fixture_teacher_distils_into_a_smaller_llama(tmp_path, variant):
  workdir = tmp_path / "run"
  assert _train(workdir, variant) == 0
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["name"] == "llama" and config["model"]["num_hidden_layers"] == 1
  term = {"kd": "kd", "reverse_kl": "reverse_kl", "jsd": "jsd", "kd,impl=fused": "kd"}[variant]
  lines = [l for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]
  assert lines and all(np.isfinite(l["loss"]) and l[f"distill/{term}"] > 0 for l in lines)
  arrays, _ = checkpoint_contents(workdir / "checkpoints", 4)
  assert arrays[("params", "student", "embed", "embedding")].shape == (400, 32)
  assert len([k for k in arrays if k[:3] == ("params", "student", "layers")]) == 9  # one block's 9 tensors


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("kd") / "run"
  assert _train(workdir, "kd") == 0
  return workdir


def test_export_writes_the_trained_student_with_its_tokenizer(kd_run, tmp_path, capsys):
  out = tmp_path / "export"
  assert cli.main(["export", f"--workdir={kd_run}", f"--out={out}"]) == 0
  assert "exported to" in capsys.readouterr().out
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
  hf = json.loads((out / "config.json").read_text())
  assert (hf["model_type"], hf["num_hidden_layers"], hf["vocab_size"]) == ("llama", 1, 400)
  model = from_pretrained(out)
  saved, _ = checkpoint_contents(kd_run / "checkpoints", 4)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert len(flat) == len([k for k in saved if k[:2] == ("params", "student")]) > 5
  for path, value in flat.items():
    np.testing.assert_array_equal(value, saved[("params", "student", *path)], err_msg=str(path))


def test_export_refuses_a_non_empty_folder_and_an_unknown_step(kd_run, tmp_path, capsys):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert cli.main(["export", f"--workdir={kd_run}", f"--out={out}"]) == 2
  assert cli.main(["export", f"--workdir={kd_run}", f"--out={tmp_path / 'new'}", "--step=3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith(f"kdlab: error: --out={out}: exists and is not an empty folder")
  assert err[1].startswith("kdlab: error: --step=3:") and "it has steps 4" in err[1]
  assert [p.name for p in out.iterdir()] == ["keep.txt"] and not (tmp_path / "new").exists()


def _initial_student(spec: str, *overrides: str) -> tuple[dict, dict]:
  """The student's parameters a fresh run of ``lm_hf.py:spec`` starts from, and teacher 0's."""
  from kdlab.train import optim, student_init
  from kdlab.train import teachers as teacherlib
  from kdlab.train.prepare import prepare
  from kdlab.train.state import create_state
  config = kconfig.apply_overrides(kconfig.load(f"{HF}:{spec}"), list(overrides))
  setup = prepare(config)
  _, teacher_vars = teacherlib.load_teachers(setup.teacher_specs, setup.mesh)
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  _, state = create_state(setup.make_learner, tx, {}, config.seed, ema=False, mesh=setup.mesh,
                          param_shardings=setup.param_shardings)
  state = student_init.apply(setup.student_init, state, setup.learner.student, setup.param_shardings["student"],
                             teacher_vars)
  return jax.tree.map(np.asarray, state.params["student"]), jax.tree.map(np.asarray, teacher_vars[0][0])


def test_student_initialized_from_selected_teacher_layers():
  student, teacher = _initial_student(f"kd,quick,teacher={TEACHER},init=1")
  assert list(student["layers"]) == [0]
  for key in ("embed", "final_norm", "unembed"):
    jax.tree.map(np.testing.assert_array_equal, student[key], teacher[key])
  jax.tree.map(np.testing.assert_array_equal, student["layers"][0], teacher["layers"][1])
  assert not np.array_equal(student["layers"][0]["attn"]["q"]["kernel"], teacher["layers"][0]["attn"]["q"]["kernel"])


def test_student_from_a_hugging_face_directory_starts_with_its_weights():
  student, _ = _initial_student(f"kd,quick,teacher={FIXTURES / 'qwen2'},student={TEACHER}")
  reference = nnx.to_pure_dict(nnx.state(from_pretrained(TEACHER), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, student, jax.tree.map(np.asarray, reference))


def test_padded_teacher_vocabulary_is_aligned_to_the_student(tmp_path):
  """qwen2 fixture: the same tokenizer as the llama fixture, its embedding padded to 416 rows."""
  from kdlab.train.prepare import prepare
  config = kconfig.load(f"{HF}:kd,quick,teacher={FIXTURES / 'qwen2'},student={TEACHER}")
  setup = prepare(config)
  assert setup.teacher_specs[0]["vocab"] == 400 and setup.student_vocab is None
  assert setup.shapes.teachers[0].logits.shape[-1] == 400
  workdir = tmp_path / "run"
  assert _train(workdir, "kd", overrides=[f"--config.teachers[0].init=hf:{FIXTURES / 'qwen2'}",
                                          f"--config.model={{'name': 'hf', 'path': '{TEACHER}', 'max_len': 32}}"]) == 0
  assert all(np.isfinite(l["loss"]) for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l)


def _copy_fixture(tmp_path, name: str = "llama"):
  target = tmp_path / name
  shutil.copytree(FIXTURES / name, target)
  return target



@pytest.mark.parametrize("breakage, message", [
    ("no_config", "config.teachers[0].init={dir!r}: no config.json there; give a local Hugging Face model directory"),
    ("model_type", "config.json: model_type 'mamba'"),
    ("missing_tensor", "model.safetensors: tensor model.layers.1.mlp.up_proj.weight missing"),
    ("wrong_shape", "tensor model.norm.weight has shape [31], config.json implies [32]"),
    ("other_tokenizer", "differs from the student's"),
])
def test_bad_pretrained_teacher_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, breakage, message):
  from safetensors.numpy import load_file, save_file
  bad = _copy_fixture(tmp_path)
  if breakage == "no_config":
    (bad / "config.json").unlink()
  elif breakage == "model_type":
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
  elif breakage in ("missing_tensor", "wrong_shape"):
    tensors = load_file(str(bad / "model.safetensors"))
    if breakage == "missing_tensor":
      del tensors["model.layers.1.mlp.up_proj.weight"]
    else:
      tensors["model.norm.weight"] = tensors["model.norm.weight"][:31]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  else:
    for name in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copyfile(ROOT / "tests" / "fixtures" / "hf_tokenizer" / "other" / name, bad / name)
  workdir = tmp_path / "run"
  # The student is the intact fixture (its tokenizer on the data), the teacher the broken copy.
  code = cli.main(["train", f"--config={HF}:kd,quick,teacher={TEACHER},student={TEACHER}", f"--workdir={workdir}",
                   *ARGS, f"--config.teachers[0].init=hf:{bad}"])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("kdlab: error: "), err
  assert message.format(dir=str(bad)) in err
  assert not workdir.exists()


def test_cache_teacher_reads_a_pretrained_teacher_and_fingerprints_its_files(tmp_path, capsys):
  """``kdlab cache-teacher`` with ``init="hf:DIR"``: built, opened by the student's config, and refused
  once the directory's weights change."""
  from kdlab.data import teacher_cache
  from kdlab.errors import UserError
  from kdlab.train import teachers as teacherlib
  teacher = _copy_fixture(tmp_path)
  spec = f"{HF}:kd,quick,teacher={teacher}"
  out = tmp_path / "cache"
  assert cli.main(["cache-teacher", f"--config={spec}", f"--out={out}", "--no-progress"]) == 0
  assert "teacher cache built:" in capsys.readouterr().out
  meta = json.loads((out / "meta.json").read_text())
  assert meta["vocab_size"] == 400 and 0 < meta["reconstruction_kl"] < 1e-3
  teacher_cache.open_cache(out, expected_fingerprint=teacherlib.fingerprint(kconfig.load(spec)))
  weights = teacher / "model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-4:] = bytes(4)  # the last float32 of the last tensor
  weights.write_bytes(bytes(data))
  with pytest.raises(UserError, match=r"differs in teacher"):
    teacher_cache.open_cache(out, expected_fingerprint=teacherlib.fingerprint(kconfig.load(spec)))
