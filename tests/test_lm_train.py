"""Language models through the training loop: pysrc, a GPT teacher, token-level KD, resume, bad input."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from kdlab import cli
from kdlab.config import load
from kdlab.errors import UserError
from kdlab.train import checkpoint
from kdlab.train.prepare import prepare
from kdlab.train.loop import train

from conftest import HINTON, ROOT, mark_finished, random_gpt_run, read_jsonl

LM = str(ROOT / "configs" / "lm_pysrc.py")


def _config(variant, teacher=None, **train_fields):
  config = load(f"{LM}:{variant},quick" + (f",teacher={teacher}" if teacher else ""))
  for key, value in train_fields.items():
    config.train[key] = value
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm")
  train(_config("teacher"), root / "teacher", use_wandb=False, progress=False)
  train(_config("kd", root / "teacher" / "checkpoints"), root / "kd", use_wandb=False, progress=False)
  return root


def _train_losses(workdir):
  return [l["loss"] for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]


def test_lm_trains_on_pysrc_and_reports_validation_metrics(runs):
  losses = _train_losses(runs / "teacher")
  assert losses[-1] < losses[0] - 0.5  # From ~ln(256) = 5.5 nats per byte.
  summary = json.loads((runs / "teacher" / "summary.json").read_text())
  assert summary["val_loss"] < math.log(256) - 1.0
  assert max(losses[-1], summary["val_loss"]) < math.log(256) - 1.5  # 40 steps: 1.5 nats below a uniform guess.
  assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
  assert summary["best_val_loss"] <= summary["val_loss"]
  assert summary["kl_teacher"] is None and summary["agreement_top1"] is None  # No teacher.
  line = [l for l in read_jsonl(runs / "teacher" / "metrics.jsonl") if "loss" in l][0]
  assert {"task/ce", "train/accuracy", "l2_grads"} <= set(line)


def test_kd_run_reports_per_token_metrics_against_its_teacher(runs):
  summary = json.loads((runs / "kd" / "summary.json").read_text())
  teacher = json.loads((runs / "teacher" / "summary.json").read_text())
  # The kd run evaluates the teacher on the same validation tokens the teacher run did.
  assert summary["teacher_val_loss"] == pytest.approx(teacher["val_loss"], rel=1e-5)
  assert summary["val_tokens"] == teacher["val_tokens"]
  assert 0.0 < summary["kl_teacher"] < 1.0
  assert 0.0 < summary["agreement_top1"] <= 1.0
  lines = read_jsonl(runs / "kd" / "metrics.jsonl")
  assert "distill/kd" in lines[0]
  kd = [l["distill/kd"] for l in lines if "distill/kd" in l]
  assert kd[-1] < kd[0]


def test_killed_kd_run_resumes_only_the_remaining_steps_to_the_same_result(runs, tmp_path, monkeypatch):
  import jax
  from conftest import (assert_same_arrays, checkpoint_contents, kill_after_first_checkpoint, tree_snapshot,
                        watch_resume)
  config = _config("kd", runs / "teacher" / "checkpoints")
  workdir = tmp_path / "kd"
  # Killed at its first train line after the half-way checkpoint (it logged past it).
  first, drawn = kill_after_first_checkpoint(monkeypatch, lambda: train(config, workdir, use_wandb=False,
                                                                         progress=False))
  lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
  kept = [l for l in lines if json.loads(l)["step"] <= first]
  assert kept and len(kept) < len(lines) and not (workdir / "summary.json").exists()
  assert first < config.train.num_steps
  saved = tree_snapshot(workdir / "checkpoints" / str(first))
  stored_state, stored_data = checkpoint_contents(workdir / "checkpoints", first)

  seen = watch_resume(monkeypatch)
  resumed = json.loads(json.dumps(train(config, workdir, use_wandb=False, progress=False)))
  jax.effects_barrier()
  # Only the remaining steps ran, from exactly the state and data position the checkpoint holds.
  assert sorted(seen["steps"]) == list(range(first, config.train.num_steps))
  [(directory, step, state, data_state)] = seen["restored"]
  assert directory == workdir / "checkpoints" and step == first and state[("step",)] == first
  assert_same_arrays(state, stored_state)
  assert data_state == stored_data
  assert len(seen["batches"]) == config.train.num_steps - first
  for key, value in drawn[first].items():  # The batch the killed run drew after the checkpoint comes next.
    np.testing.assert_array_equal(seen["batches"][0][key], value, err_msg=key)
  # The earlier checkpoint and log lines are untouched; the killed run's later lines are replaced.
  assert tree_snapshot(workdir / "checkpoints" / str(first)) == saved
  assert (workdir / "metrics.jsonl").read_text().startswith("".join(kept))
  full = json.loads((runs / "kd" / "summary.json").read_text())
  drop = ("wall_time_s", "steps_per_s")
  assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
  full_log, resumed_log = read_jsonl(runs / "kd" / "metrics.jsonl"), read_jsonl(workdir / "metrics.jsonl")
  assert [l["step"] for l in resumed_log] == [l["step"] for l in full_log]
  np.testing.assert_allclose([l.get("loss", l.get("val/loss")) for l in resumed_log],
                             [l.get("loss", l.get("val/loss")) for l in full_log], rtol=1e-6)


def test_minilm_terms_get_the_attention_taps_they_name(runs, tmp_path):
  config = _config("kd", runs / "teacher" / "checkpoints", num_steps=2)
  config.objective = [dict(loss="kd", weight=1.0),
                      dict(loss="attention_kl", weight=1.0, student="attn0", teacher="attn1"),
                      dict(loss="value_relation", weight=1.0, student="values0", teacher="values1")]
  setup = prepare(config)
  assert setup.student_taps == ("attn0", "values0")  # gpt computes them only on request
  assert {"attn1", "values1"} <= set(setup.teacher_specs[0]["taps"])
  train(config, tmp_path / "minilm", use_wandb=False, progress=False)
  line = [l for l in read_jsonl(tmp_path / "minilm" / "metrics.jsonl") if "loss" in l][-1]
  assert line["distill/attention_kl"] > 0 and line["distill/value_relation"] > 0


def test_kdlab_sample_continues_with_the_weights_kdlab_train_saved(tmp_path, capsys):
  """docs/generation.md: ``kdlab sample --workdir=RUN`` on a run of ``kdlab train`` (its last checkpoint)."""
  import jax.numpy as jnp
  from flax import nnx
  from kdlab import models
  from kdlab.data.text import ByteTokenizer
  workdir, prompt, n = tmp_path / "run", "def f(", 12
  assert cli.main(["train", f"--config={LM}:teacher,quick,steps=12", f"--workdir={workdir}", "--nowandb",
                   "--no-progress"]) == 0
  capsys.readouterr()
  assert cli.main(["sample", f"--workdir={workdir}", f"--prompt={prompt}", f"--max_new_tokens={n}",
                   "--temperature=0"]) == 0
  printed = capsys.readouterr().out
  spec = dict(json.loads((workdir / "config.json").read_text())["model"])
  params, _ = checkpoint.load_student_variables(workdir / "checkpoints", "run")

  forward = nnx.jit(lambda model, seq: model(seq, train=False)[0])

  def greedy(model):  # the plain forward pass, one token at a time, in a buffer of the model's width (causal)
    ids = [ByteTokenizer.EOD, *ByteTokenizer().encode(prompt)]
    seq = np.zeros((1, model.max_len), np.int32)
    seq[0, :len(ids)] = ids
    for i in range(len(ids), len(ids) + n):
      seq[0, i] = int(jnp.argmax(forward(model, seq)[0, i - 1]))
    new = seq[0, len(ids):len(ids) + n].tolist()
    return ByteTokenizer().decode(new[:new.index(0)] if 0 in new else new)

  fresh = models.create(spec.pop("name"), seed=0, **spec)
  untrained = greedy(fresh)
  state = nnx.state(fresh, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(fresh, state)
  trained = greedy(fresh)
  assert trained != untrained  # the saved weights decide what is printed
  assert printed == prompt + trained + "\n"


def _token_kd_run(workdir: pathlib.Path, teacher: pathlib.Path, impl: str) -> list[dict]:
  """kd alone (ce=0) for 5 steps, every step logged; chunked/fused in chunks of 80 tokens = 10 of the
  32 positions (starts 0, 10, 20, 22: the last chunk overlaps the one before)."""
  config = load(f"{LM}:kd,quick,steps=5,ce=0,impl={impl},teacher={teacher}")
  if impl != "plain":
    config.objective[0]["chunk_size"] = 80
  config.train.log_every_steps = 1
  config.train.eval_every_epochs = config.train.checkpoint_every_epochs = 100.0  # only at the end
  train(config, workdir, use_wandb=False, progress=False)
  return [l for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]


@pytest.fixture(scope="module")
def plain_token_kd(tmp_path_factory):
  root = tmp_path_factory.mktemp("token_kd")
  teacher = random_gpt_run(root / "teacher")
  return teacher, _token_kd_run(root / "plain", teacher, "plain"), root


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_chunked_and_fused_token_kd_train_to_the_plain_losses_and_gradients(plain_token_kd, tmp_path, impl):
  teacher, plain, root = plain_token_kd
  got = _token_kd_run(tmp_path / impl, teacher, impl)
  assert [l["step"] for l in got] == [l["step"] for l in plain] == [1, 2, 3, 4, 5]
  assert plain[0]["distill/kd"] > 0.5  # a peaked teacher: far from the student at init
  for key in ("distill/kd", "loss", "l2_grads", "l2_params"):
    np.testing.assert_allclose([l[key] for l in got], [l[key] for l in plain], rtol=1e-5, err_msg=key)
  params = [checkpoint.load_student_variables(d / "checkpoints", d.name)[0] for d in (tmp_path / impl, root / "plain")]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *params)  # Adam: ~3e-3 steps


def _fake_teacher(root: pathlib.Path, **model) -> pathlib.Path:
  """A teacher run folder with a config.json and a checkpoint step (start-up reads only the config)."""
  (root / "checkpoints" / "1").mkdir(parents=True)
  spec = {**dict(name="gpt", vocab_size=256, d_model=32, num_layers=1, num_heads=2, max_len=32), **model}
  (root / "config.json").write_text(json.dumps({"model": spec}))
  mark_finished(root)
  return root / "checkpoints"


@pytest.mark.parametrize("variant, overrides, fake, message", [
    ("kd", [], dict(vocab_size=512), "config.teachers[0]: the teacher's vocab_size is 512 but the student's 256"),
    ("student", ["--config.data.seq_len=64"], None, "config.data.seq_len=64 exceeds config.model.max_len=32"),
    ("kd", [], dict(max_len=16), "config.data.seq_len=32 exceeds config.teachers[0].max_len=16"),
    ("kd", ["--config.objective[0].impl=fast"], None, "config.objective[0] (kd): impl='fast': unknown"),
    ("kd", ["--config.objective[0].impl=chunked", "--config.objective[0].loss=logit_l2"], None,
     "impl='chunked': only kd, reverse_kl, jsd, tvd have chunked and fused forms"),
    ("student", ["--config.model.vocab_size=100"], None, "config.model.vocab_size=100 is smaller than the 256"),
])
def test_bad_input_is_one_line_error_before_anything_is_written(runs, tmp_path, capsys, variant, overrides,
                                                                 fake, message):
  teacher = _fake_teacher(tmp_path / "fake", **fake) if fake else runs / "teacher" / "checkpoints"
  workdir = tmp_path / "run"
  code = cli.main(["train", f"--config={LM}:{variant},quick,teacher={teacher}", f"--workdir={workdir}",
                   "--nowandb", "--no-progress", *overrides])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("kdlab: error: ") and len(err.strip().splitlines()) == 1, err
  assert message in err
  assert not workdir.exists()


@pytest.mark.parametrize("config, objective, message", [
    (f"{HINTON}:student,source=digits,quick", "[{'loss': 'kd', 'impl': 'fused'}]",
     "config.objective[0] (kd): impl='fused' applies to token logits [batch, length, vocab] (language models)"),
    (f"{LM}:kd,quick", "[{'loss': 'logit_l2', 'impl': 'fused'}]",
     "impl='fused': only kd, reverse_kl, jsd, tvd have chunked and fused forms"),
    (f"{LM}:kd,quick", "[{'loss': 'kd', 'impl': 'fused', 'from_teachers': ['a', 'b'], 'combine': 'mean_probs'}]",
     "impl='fused' distils from one teacher (from_teacher); use impl='plain' with from_teachers"),
    (f"{LM}:kd,quick", "[{'loss': 'kd', 'impl': 'fused', 'student': 'block0', 'teacher': 'block0'}]",
     "impl='fused' computes the logits from feats['final']; it takes student='logits' and teacher='logits'"),
    (f"{LM}:kd,quick", "[{'loss': 'kd', 'impl': 'plain', 'chunk_size': 64}]",
     "chunk_size applies to impl='chunked' or impl='fused'"),
])
def test_documented_fused_and_chunked_misuse_is_a_one_line_error(tmp_path, capsys, config, objective, message):
  """docs/lm.md "Checked at start-up" (a model without an unembedding cannot reach a text source:
  only gpt models pass the language-model checks)."""
  teacher = _fake_teacher(tmp_path / "fake")
  teachers = [] if config.startswith(HINTON) else [
      f"--config.teachers=[{{'init': '{teacher}', 'name': 'a'}}, {{'init': '{teacher}', 'name': 'b'}}]"]
  workdir = tmp_path / "run"
  code = cli.main(["train", f"--config={config}", f"--workdir={workdir}", "--nowandb", "--no-progress", *teachers,
                   f"--config.objective={objective}"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("kdlab: error: ") and len(err.strip().splitlines()) == 1, err
  assert message in err
  assert not workdir.exists()


def test_sweep_tables_and_report_of_language_model_runs(tmp_path):
  """Aggregation only (synthetic summaries): the LM columns, the lowest mean val loss in bold."""
  from kdlab import sweep as ksweep
  file = tmp_path / "methods.py"
  file.write_text('def get_sweep():\n  return {"name": "lm", "seeds": [0, 1], '
                  '"list": [{"objective[0].loss": "kd"}, {"objective[0].loss": "reverse_kl"}]}\n')
  sweep, _ = ksweep.plan(f"{LM}:kd", str(file))
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  (workdir / "sweep.json").write_text(json.dumps(sweep.to_json()))
  for run in sweep.runs():
    loss = (2.0 if "reverse_kl" in run.name else 2.1) + 0.01 * run.seed
    (workdir / run.name).mkdir(parents=True)
    (workdir / run.name / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": 1.0, "val/loss": loss}) + "\n")
    (workdir / run.name / "summary.json").write_text(json.dumps({
        "steps": 10, "val_loss": loss, "best_val_loss": loss, "val_ppl": math.exp(loss),
        "best_val_ppl": math.exp(loss), "val_accuracy": 0.5, "val_tokens": 100, "kl_teacher": 0.3,
        "agreement_top1": 0.6, "teacher_val_loss": 1.9, "wall_time_s": 1.0, "steps_per_s": 5.0,
        "runs_in_step": 1}))
  assert cli.main(["report", str(workdir)]) == 0
  table = (workdir / "results.md").read_text()
  assert "last val loss (nats/token)" in table and "KL(teacher, student)" in table
  assert "| reverse_kl | **2.0050 +/- 0.0071** |" in table
  header = (workdir / "results.csv").read_text().splitlines()[0].split(",")
  assert header[header.index("finished") + 1:][:3] == ["steps", "val_loss", "best_val_loss"]
  assert "lowest among the periodic evaluations" in (workdir / "report.md").read_text()


def test_distillation_recipe_warms_up_on_ce_and_scales_jsd_to_kl():
  from kdlab.objective import make_schedule
  kd = load(f"{LM}:kd").objective
  weight = make_schedule(kd[0]["weight"], "kd")
  assert [float(weight(s)) for s in (0, 100, 150, 200, 600)] == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.5])
  assert kd[1] == {"loss": "ce", "weight": 0.5}
  jsd = load(f"{LM}:jsd,beta=0.2,warmup=0").objective
  assert jsd[0]["weight"] == pytest.approx(0.5 / (0.2 * 0.8))
  assert load(f"{LM}:kd,quick").objective[0]["weight"] == 0.5  # tests: no warm-up
  assert load(f"{LM}:reverse_kl,ce=0").objective == [
      {"loss": "reverse_kl", "temperature": 1.0, "impl": "plain", "weight": 1.0}]
  with pytest.raises(UserError, match="warmup=50 with ce=0"):
    load(f"{LM}:kd,ce=0,warmup=50")


@pytest.mark.parametrize("variant, loss", [("gkd", "jsd"), ("gkd_full", "jsd"), ("onpolicy_rkl", "reverse_kl"),
                                           ("supervised_kd", "kd"), ("onpolicy_kd", "kd")])
def test_lm_gkd_variants_train_on_their_divergence_alone(variant, loss):
  """configs/lm_gkd.py pins its objective: lm_pysrc's CE mixing, warm-up and JSD scale do not reach it."""
  term = {"loss": loss, "temperature": 1.0, "impl": "plain", "weight": 1.0}
  assert list(load(f"{ROOT / 'configs' / 'lm_gkd.py'}:{variant}").objective) == [
      dict(term, beta=0.5) if loss == "jsd" else term]
