"""Bad input is refused before anything is written (issue 18): out-of-range fields, malformed meshes,
config and sweep files that do not import, misspelled variant options, workdirs that cannot be written,
teachers that do not fit the student or did not finish. Each answer is one ``kdlab: error:`` line,
exit status 2, and an existing finished run stays byte-identical.

Most cases run ``kdlab.cli.main`` in this process (milliseconds each); two run the real command in a
child process to check what a user sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil

import pytest

from kdlab import cli, config as kconfig
from kdlab.errors import UserError

from conftest import HINTON, ROOT, kdlab_cmd, random_gpt_run, run_child, tree_snapshot

STUDENT = f"{HINTON}:student,quick,source=digits"
KD = f"{HINTON}:kd,quick,source=digits"
FLAGS = ("--no-wandb", "--no-progress")


def _cli(*args: str) -> tuple[int, str]:
  """``kdlab ARGS`` in this process: its exit status and stderr."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main([*args, *FLAGS] if args[0] == "train" else list(args))
  return code, err.getvalue()


def _refused(code: int, err: str, *needles: str) -> None:
  assert code == 2, err[-3000:]
  assert err.startswith("kdlab: error: ") and err.count("\n") == 1, err[-3000:]
  for needle in needles:
    assert needle in err, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Finished runs: a teacher (MLP on digits), a student (the existing workdir the cases must leave as it
  is) and a gpt teacher."""
  root = tmp_path_factory.mktemp("validation")
  for name, spec in (("teacher", f"{HINTON}:teacher,quick,source=digits"), ("student", STUDENT)):
    code, err = _cli("train", f"--config={spec}", f"--workdir={root / name}", "--config.train.num_steps=2")
    assert code == 0, err
  random_gpt_run(root / "gpt")
  return {"root": root, "teacher": root / "teacher", "student": root / "student", "gpt": root / "gpt"}


def _teacher_copy(runs, root: pathlib.Path, **model) -> pathlib.Path:
  """A copy of the teacher run whose config.json says ``model`` (e.g. another input size)."""
  shutil.copytree(runs["teacher"], root)
  saved = json.loads((root / "config.json").read_text())
  saved["model"].update(model)
  (root / "config.json").write_text(json.dumps(saved))
  return root


def _student_args(runs, *overrides: str) -> list[str]:
  return ["train", f"--config={STUDENT}", f"--workdir={runs['student']}", "--config.train.num_steps=2", *overrides]


# --- numeric ranges, meshes, structure ------------------------------------------------------------

BAD_VALUES = [
    ("batch_size", "--config.data.batch_size=0", "config.data.batch_size=0: must be a whole number >= 1"),
    ("eval_batch_size", "--config.data.eval_batch_size=0", "config.data.eval_batch_size=0: must be a whole number"),
    ("seed", "--config.seed=-1", "config.seed=-1: must be a whole number >= 0"),
    ("seed_uint32", f"--config.seed={2**32}", "seeds must fit in uint32"),
    ("num_steps", "--config.train.num_steps=-1", "config.train.num_steps=-1: must be a whole number >= 0"),
    ("num_epochs", "--config.train.num_epochs=1e999", "config.train.num_epochs=inf: must be a number >= 0"),
    ("log_every", "--config.train.log_every_steps=0", "config.train.log_every_steps=0: must be a whole number"),
    ("eval_every", "--config.train.eval_every_epochs=-1.0",
     "config.train.eval_every_epochs=-1.0: must be a number > 0"),
    ("checkpoint_every", "--config.train.checkpoint_every_epochs=0.0",
     "config.train.checkpoint_every_epochs=0.0: must be a number > 0"),
    ("vmap_seeds", "--config.vmap_seeds=-3", "config.vmap_seeds=-3: must be a whole number >= 0"),
    ("microbatches", "--config.train.microbatches=0", "config.train.microbatches=0: must be a whole number >= 1"),
    ("max_loss", "--config.train.max_loss={}", "config.train.max_loss={}: must be None or a number > 0"),
    ("keep", "--config.checkpoint.keep=0", "config.checkpoint.keep=0: must be a whole number >= 1"),
    ("best_metric", "--config.checkpoint.best_metric=False",
     "config.checkpoint.best_metric=False: must be None or an eval metric's name"),
    ("best_mode", "--config.checkpoint.best_mode='top'",
     "config.checkpoint.best_mode='top': must be None, 'max' or 'min'"),
    ("dropout", "--config.model.dropout=1.0", "config.model.dropout=1.0: must be a number in [0, 1)"),
    ("hidden", "--config.model.hidden=(64, 0)", "config.model.hidden=(64, 0): must be a list of whole numbers >= 1"),
    ("momentum", "--config.optimizer.momentum=-0.5", "config.optimizer.momentum=-0.5: must be a number in [0, 1)"),
    ("weight_decay", "--config.optimizer.weight_decay=-1.0", "config.optimizer.weight_decay must be a number >= 0"),
    ("learning_rate", "--config.optimizer.learning_rate=1e999", "config.optimizer.learning_rate must be > 0"),
    ("warmup", "--config.optimizer.warmup_epochs=-1.0", "config.optimizer.warmup_epochs=-1.0: must be a number >= 0"),
    ("std", "--config.data.std=(0.0,)", "config.data.std=(0.0,): must be a list of numbers > 0"),
    ("mean", "--config.data.mean=[]", "must be a list of finite numbers, one per channel (1) or one for all"),
    ("augment", "--config.data.augment='flip'", "config.data.augment='flip': unknown augmentation"),
    ("mesh_entries", "--config.mesh=[1, 2, 3]", "config.mesh=[1, 2, 3]: entry 1 is not an (axis name, size) pair"),
    ("mesh_size", "--config.mesh=[('data', 0)]", "axis 'data' has size 0"),
    ("mesh_no_data_axis", "--config.mesh=[('model', -1)]", "no data-parallel axis ('data' or 'fsdp'), so every device"),
    ("teachers", "--config.teachers=[0]", "config.teachers[0]=0: must be a dict"),
    ("section", "--config.born_again=1", "--config.born_again=1: expected None (off) or a dict"),
    ("section_fields", "--config.train={'num_step': 3}", "unknown config field config.train.num_step"),
]


@pytest.mark.parametrize("override, message", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(runs, tmp_path, override, message):
  before = tree_snapshot(runs["student"])
  _refused(*_cli(*_student_args(runs, override)), message)
  assert tree_snapshot(runs["student"]) == before
  new = tmp_path / "new"
  _refused(*_cli("train", f"--config={STUDENT}", f"--workdir={new}", override), message)
  assert not new.exists()


def test_the_bad_values_of_issue_18_are_refused_by_the_real_command(runs):
  """What a user sees: exit status 2 and one line on stderr, for the values that used to crash after writing."""
  for override in ("--config.data.eval_batch_size=0", "--config.seed=-1", "--config.mesh=[1,2,3]"):
    proc = run_child(kdlab_cmd(*_student_args(runs, override), *FLAGS), check=False, timeout=300)
    _refused(proc.returncode, proc.stderr, override.split("=")[0].removeprefix("--"))


def test_a_language_model_run_refuses_a_bad_sequence_length(tmp_path):
  lm = f"{ROOT / 'configs' / 'lm_pysrc.py'}:teacher,quick"
  for override, message in (("--config.data.seq_len=0", "config.data.seq_len must be an int >= 1, got 0"),
                            ("--config.data.seq_len=64", "config.data.seq_len=64 exceeds config.model.max_len=32")):
    _refused(*_cli("train", f"--config={lm}", f"--workdir={tmp_path / 'lm'}", override), message)
  assert not (tmp_path / "lm").exists()


# --- variant options ------------------------------------------------------------------------------

# Every config file with one of its variants (cifar100_crd parses its own options).
VARIANTS = {"hinton_mnist.py": "kd", "byot_mnist.py": "byot", "ensemble_mnist.py": "ensemble",
            "self_distill_mnist.py": "ban", "mnist5k_resnet.py": "kd", "lm_pysrc.py": "kd", "lm_gkd.py": "gkd",
            "lm_hf.py": "kd", "lm_instruct.py": "kd", "llm_distill.py": "kd",
            "cifar100_crd.py": "resnet32x4-resnet8x4-kd"}


def test_every_config_file_refuses_a_misspelled_option():
  files = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "common.py")
  assert files == sorted(VARIANTS)
  for name, variant in VARIANTS.items():
    with pytest.raises(UserError, match="unknown option 'quik'"):
      kconfig.load(f"{ROOT / 'configs' / name}:{variant},quik")


def test_a_misspelled_option_lists_the_allowed_ones(runs):
  before = tree_snapshot(runs["student"])
  code, err = _cli("train", f"--config={HINTON}:student,quick,epoch=3", f"--workdir={runs['student']}")
  _refused(code, err, "unknown option 'epoch'; the options of this config are source, epochs, omit, quick")
  assert tree_snapshot(runs["student"]) == before


# --- config and sweep files -----------------------------------------------------------------------

BAD_FILES = [
    ("syntax", "def get_config(arg=None):\n  return dict(a=1\n", "does not import: SyntaxError"),
    ("import", "import no_such_module_here\n", "does not import: ModuleNotFoundError: No module named"),
    ("none", "def get_config(arg=None):\n  return None\n", "returned NoneType, not an ml_collections.ConfigDict"),
    ("raises", "def get_config(arg=None):\n  return {}['model']\n",
     "get_config(None) failed with KeyError: 'model' (line 2 of"),
    ("missing", "x = 1\n", "defines no get_config(arg)"),
]


@pytest.mark.parametrize("body, message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, body, message):
  (tmp_path / "bad.py").write_text(body)
  code, err = _cli("train", f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'run'}")
  _refused(code, err, message, "bad.py")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body, message", [
    ("def get_sweep(:\n", "--sweep: {file} does not import: SyntaxError"),
    ("def get_sweep():\n  return 1 / 0\n", "get_sweep('') failed with ZeroDivisionError: division by zero (line 2 of"),
    ("def get_sweep():\n  return {'seeds': [-1]}\n", "seeds [-1]: each must be in [0, 4294967294]"),
], ids=["syntax", "raises", "seed"])
def test_a_sweep_file_that_fails_is_one_line_naming_it(tmp_path, body, message):
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(body)
  code, err = _cli("sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={tmp_path / 'sweep'}")
  _refused(code, err, message.format(file=sweep_file))
  assert not (tmp_path / "sweep").exists()


def test_a_sweep_setting_with_an_unknown_best_metric_is_refused_before_any_run(tmp_path):
  """The best checkpoint's metric is checked against each setting's eval metrics (known only once its
  model and teachers are built) before the sweep writes anything, not when its run starts."""
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text("def get_sweep():\n  return {'list': [{'checkpoint.best_metric': 'test/acc'}]}\n")
  code, err = _cli("sweep", f"--config={STUDENT}", f"--sweep={sweep_file}", f"--workdir={tmp_path / 'sweep'}",
                   "--config.train.num_steps=2", "--no-wandb")
  _refused(code, err, "setting checkpoint.best_metric=test_acc: config.checkpoint.best_metric='test/acc': not an "
                      "eval metric of this run; use one of", "test/accuracy")
  assert not (tmp_path / "sweep").exists()


def test_a_config_file_with_a_syntax_error_is_one_line_from_the_real_command(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(arg=None)\n  return {}\n")
  proc = run_child(kdlab_cmd("train", f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'run'}", *FLAGS),
                   check=False, timeout=120)
  _refused(proc.returncode, proc.stderr, f"{tmp_path / 'bad.py'} does not import: SyntaxError", "(line 1 of")


# --- the workdir ----------------------------------------------------------------------------------

def test_a_workdir_that_is_a_file_or_under_one_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  _refused(*_cli("train", f"--config={STUDENT}", f"--workdir={tmp_path / 'file'}"), "it is a file, not a directory")
  _refused(*_cli("train", f"--config={STUDENT}", f"--workdir={tmp_path / 'file' / 'run'}"),
           "is a file, so the directory cannot be created")
  assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_read_only_workdir_is_refused(tmp_path):
  (tmp_path / "ro").mkdir()
  (tmp_path / "ro").chmod(0o555)
  try:
    _refused(*_cli("train", f"--config={STUDENT}", f"--workdir={tmp_path / 'ro'}"), "is not writable")
    _refused(*_cli("train", f"--config={STUDENT}", f"--workdir={tmp_path / 'ro' / 'run'}"), "is not writable")
  finally:
    (tmp_path / "ro").chmod(0o755)
  assert list((tmp_path / "ro").iterdir()) == []


# --- teachers -------------------------------------------------------------------------------------

def _kd(runs, teacher: pathlib.Path | str, *overrides: str) -> list[str]:
  return ["train", f"--config={KD}", f"--workdir={runs['student']}", "--config.train.num_steps=2",
          f"--config.teachers[0].init={teacher}", *overrides]


def test_a_teacher_that_does_not_fit_the_student_is_refused_in_one_line(runs, tmp_path):
  """Input sizes and shapes are compared (abstractly) before anything runs or is written."""
  before = tree_snapshot(runs["student"])
  wider = _teacher_copy(runs, tmp_path / "wider", in_features=784)  # (refused before its checkpoint is read)
  _refused(*_cli(*_kd(runs, wider / "checkpoints")),
           "config.teachers[0]: the teacher's model takes in_features=784 but config.data.source='digits' has "
           "inputs of shape (8, 8, 1) = 64 features")
  _refused(*_cli(*_kd(runs, runs["gpt"] / "checkpoints")),
           "config.teachers[0]: GPT cannot take the inputs of config.data.source='digits', of shape (8, 8, 1)")
  fewer = _teacher_copy(runs, tmp_path / "fewer", num_classes=5)
  _refused(*_cli(*_kd(runs, fewer / "checkpoints")), "config.teachers[0]: the teacher predicts 5 classes")
  _refused(*_cli(*_student_args(runs, "--config.model.in_features=784")),
           "config.model.in_features=784: config.data.source='digits' has inputs of shape (8, 8, 1) = 64 features; "
           "use --config.model.in_features=64")
  assert tree_snapshot(runs["student"]) == before


def test_a_teacher_checkpoint_of_another_architecture_is_refused_in_one_line(runs, tmp_path):
  """A checkpoint whose arrays are not those of the model its run's config.json says is refused when it is
  read, before the workdir is written (a new one: an existing one is refused first, as another run's)."""
  new = tmp_path / "new"
  other = _teacher_copy(runs, tmp_path / "other", hidden=[32, 32])
  _refused(*_cli(*_kd(runs, other / "checkpoints", f"--workdir={new}")), "config.teachers[0].init: the checkpoint in",
           "does not match")
  assert not new.exists()


def test_a_damaged_teacher_checkpoint_is_refused_in_one_line(runs, tmp_path):
  """A teacher checkpoint whose array files are truncated is refused when it is read, naming the teacher,
  before the (new) workdir is written."""
  new = tmp_path / "new"
  damaged = tmp_path / "damaged"
  shutil.copytree(runs["teacher"], damaged)
  arrays = [p for p in (damaged / "checkpoints").rglob("ocdbt.process_*/d/*") if p.is_file()]
  assert arrays
  for p in arrays:  # Truncated array files.
    p.write_bytes(p.read_bytes()[:10])
  _refused(*_cli(*_kd(runs, damaged / "checkpoints", f"--workdir={new}")), "config.teachers[0].init: the latest "
           f"checkpoint in '{damaged / 'checkpoints'}' cannot be read", "it is damaged")
  assert not new.exists()


def test_an_unfinished_teacher_is_refused_unless_allowed(runs, tmp_path):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(runs["teacher"], unfinished)
  (unfinished / "summary.json").unlink()
  new = tmp_path / "kd"
  args = ["train", f"--config={KD}", f"--workdir={new}", "--config.train.num_steps=2",
          f"--config.teachers[0].init={unfinished / 'checkpoints'}"]
  _refused(*_cli(*args), f"config.teachers[0].init: '{unfinished / 'checkpoints'}' is not from a finished run "
                         f"(no summary.json in {unfinished})", "--config.teachers[0].allow_unfinished=True")
  assert not new.exists()
  code, err = _cli(*args, "--config.teachers[0].allow_unfinished=True")
  assert code == 0 and (new / "summary.json").is_file(), err
  assert json.loads((new / "config.json").read_text())["teachers"][0]["allow_unfinished"] is True
  _refused(*_cli(*args, "--config.teachers[0].allow_unfinished=1"), "expected a value of type bool")


def test_a_finished_teacher_is_used_and_its_entry_has_allow_unfinished_false(runs, tmp_path):
  config = kconfig.load(KD)
  assert config.teachers[0]["allow_unfinished"] is False
  code, err = _cli("train", f"--config={KD}", f"--workdir={tmp_path / 'kd'}", "--config.train.num_steps=1",
                   f"--config.teachers[0].init={runs['teacher'] / 'checkpoints'}")
  assert code == 0, err
