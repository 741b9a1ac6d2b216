"""On-policy distillation (GKD / MiniLLM) and sequence-level KD: the rollout batch, lambda = 0 equals
the off-policy run, lambda = 1 trains, per-step draws of (seed, step), bad input, generate-data and training on it,
the sample-quality measure and the ``length_normalize`` option."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import kdlab.models.gpt  # noqa: F401  (registers "gpt")
from kdlab import cli, objective as objectives
from kdlab.config import load
from kdlab.errors import UserError
from kdlab.sampling import generate
from kdlab.models import registry
from kdlab.objective import ModelOutput, Shapes, StepInputs
from kdlab.train import checkpoint, on_policy
from kdlab.train.loop import train
from kdlab.train.state import Learner, init_state, split_learner

from conftest import ROOT, mark_finished, read_jsonl, tree_snapshot

LM = str(ROOT / "configs" / "lm_pysrc.py")
GKD = str(ROOT / "configs" / "lm_gkd.py")
STEPS = 6
TINY = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=2, max_len=16)


def _gkd(variant: str, teacher: pathlib.Path, **fields) -> ml_collections.ConfigDict:
  config = load(f"{GKD}:{variant},quick,steps={STEPS},teacher={teacher}")
  config.train.log_every_steps = 1
  config.train.checkpoint_every_epochs = STEPS / 64  # at the end only (64 steps per epoch)
  for path, value in fields.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _losses(workdir: pathlib.Path) -> list[float]:
  return [l["loss"] for l in read_jsonl(workdir / "metrics.jsonl") if "loss" in l]


def _params(workdir: pathlib.Path):
  return checkpoint.load_student_variables(workdir / "checkpoints", "test")[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> pathlib.Path:
  """An untrained quick lm_pysrc teacher saved as a finished run (these tests need its outputs, not its quality)."""
  root = tmp_path_factory.mktemp("gkd") / "teacher"
  config = load(f"{LM}:teacher,quick")
  root.mkdir()
  (root / "config.json").write_text(config.to_json())
  kwargs = config.model.to_dict()
  model = registry.create(kwargs.pop("name"), seed=0, **kwargs)
  _, state = init_state(Learner(model, {}), optax.sgd(0.1), {}, 0)
  ckpt = checkpoint.Checkpointer(root / "checkpoints")
  ckpt.save(1, state, {})
  ckpt.close()
  mark_finished(root)
  return root / "checkpoints"


# --- the rollout batch ----------------------------------------------------------------------------

def _learner_and_batch(b: int = 3, seq_len: int = 12):
  learner = Learner(registry.create("gpt", seed=0, **TINY), {})
  tokens = jax.random.randint(jax.random.key(1), (b, seq_len), 1, TINY["vocab_size"], jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "token_mask": jnp.ones((b, seq_len)),
           "index": jnp.arange(b, dtype=jnp.int32), "mask": jnp.ones((b,), bool)}
  return learner, batch


def test_rollout_batch_has_the_data_shapes_and_masks_only_generated_targets():
  learner, batch = _learner_and_batch()
  graphdef, params, rest = split_learner(learner)
  spec = on_policy.OnPolicy(fraction=1.0, max_new_tokens=5, temperature=1.0, prompt_len=4, seq_len=12)
  key = on_policy.rollout_key(jnp.int32(7), jnp.int32(3))
  out = jax.jit(lambda p, r, b, k: on_policy.rollout(graphdef, p, r, b, k, spec=spec))(params, rest, batch, key)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
  gen = generate(learner.student, batch["tokens"][:, :4], max_new_tokens=5, temperature=1.0, key=key)
  np.testing.assert_array_equal(out["tokens"][:, :9], gen.tokens)  # prompt + the student's own tokens
  np.testing.assert_array_equal(out["tokens"][:, :4], batch["tokens"][:, :4])
  np.testing.assert_array_equal(out["targets"][:, :-1], out["tokens"][:, 1:])  # next tokens
  # The loss mask is 1 exactly where the target is a generated token: positions P-1 .. P+N-2.
  expected = np.zeros((3, 12), np.float32)
  expected[:, 3:8] = 1.0
  np.testing.assert_array_equal(out["token_mask"], expected)
  np.testing.assert_array_equal(np.asarray(out["token_mask"][:, :8], bool), np.asarray(gen.mask)[:, 1:])
  np.testing.assert_array_equal(out["index"], batch["index"])


def test_runner_draws_per_step_and_never_generates_at_lambda_zero(monkeypatch):
  learner, batch = _learner_and_batch()
  graphdef, params, rest = split_learner(learner)
  seen = []

  class State:
    def __init__(self, step):
      self.step, self.params, self.rest = jnp.int32(step), params, rest

  def fake_step(state, teacher_vars, b):
    seen.append(b)
    return state, {"loss": (jnp.float32(1.0), jnp.float32(1.0))}

  spec = on_policy.OnPolicy(fraction=0.5, max_new_tokens=5, temperature=1.0, prompt_len=4, seq_len=12)
  step = on_policy.Runner(spec, graphdef, [3], None).wrap(fake_step)
  flags = [on_policy.is_on_policy(3, s, 0.5) for s in range(12)]
  assert 0 < sum(flags) < 12 and flags == [on_policy.is_on_policy(3, s, 0.5) for s in range(12)]
  for s in range(12):
    _, metrics = step(State(s), [], batch)
    assert float(metrics["on_policy/fraction"][0]) == float(flags[s])
    if s:
      gen_s, total_s = metrics["time/generate_fraction"]
      assert (gen_s > 0) == flags[s] and 0 <= gen_s <= total_s
  for b, on in zip(seen, flags):  # off-policy steps pass the data batch itself through
    assert (b is batch) != on
    if on:
      assert float(b["token_mask"].sum()) == 3 * 5

  def no_generation(*args, **kwargs):
    raise AssertionError("lambda = 0 must not generate")

  monkeypatch.setattr(on_policy, "rollout", no_generation)
  seen.clear()
  zero = dataclasses.replace(spec, fraction=0.0)
  step = on_policy.Runner(zero, graphdef, [3], None).wrap(fake_step)
  for s in range(5):
    _, metrics = step(State(s), [], batch)
    assert float(metrics["on_policy/fraction"][0]) == 0.0
  assert all(b is batch for b in seen)


# --- through the training loop ----------------------------------------------------------------------

def test_lambda_zero_equals_the_off_policy_run_exactly(teacher, tmp_path):
  off = _gkd("gkd", teacher, on_policy=None)
  zero = _gkd("gkd", teacher, **{"on_policy.fraction": 0.0})
  train(off, tmp_path / "off", use_wandb=False, progress=False)
  train(zero, tmp_path / "zero", use_wandb=False, progress=False)
  assert _losses(tmp_path / "off") == _losses(tmp_path / "zero")  # bit-identical
  assert all(l["on_policy/fraction"] == 0.0 for l in read_jsonl(tmp_path / "zero" / "metrics.jsonl") if "loss" in l)
  a, b = _params(tmp_path / "off"), _params(tmp_path / "zero")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  s_off = json.loads((tmp_path / "off" / "summary.json").read_text())
  s_zero = json.loads((tmp_path / "zero" / "summary.json").read_text())
  assert s_off["val_loss"] == s_zero["val_loss"] and s_off["kl_teacher"] == s_zero["kl_teacher"]


def test_lambda_one_trains_on_the_students_samples_and_logs_the_generation_share(teacher, tmp_path, monkeypatch):
  """lambda = 1: every step trains on the student's own continuations (the first step's batch is what the
  freshly initialized student samples for (seed, step 0)), masked to the generated tokens; the loss is
  finite and the generation's share of the step time is logged."""
  config = _gkd("onpolicy_rkl", teacher)
  config.objective[0]["length_normalize"] = False
  trained, wrap = [], on_policy.Runner.wrap

  def recording_wrap(self, train_step):
    def record(state, teacher_vars, batch):
      trained.append((int(np.asarray(state.step)), {k: np.asarray(v) for k, v in batch.items()}))
      return train_step(state, teacher_vars, batch)
    return wrap(self, record)

  monkeypatch.setattr(on_policy.Runner, "wrap", recording_wrap)
  summary = train(config, tmp_path / "rkl", use_wandb=False, progress=False)
  spec = on_policy.parse(config, max_len=config.model.max_len, seq_len=config.data.seq_len)
  p, n = spec.prompt_len, spec.max_new_tokens
  assert [s for s, _ in trained] == list(range(STEPS))
  for _, batch in trained:
    b = batch["tokens"].shape[0]
    assert batch["token_mask"].sum() == b * n and batch["token_mask"][:, p - 1:p - 1 + n].all()
  kwargs = config.model.to_dict()
  student = registry.create(kwargs.pop("name"), seed=config.seed, **kwargs)
  first = trained[0][1]
  sampled = generate(student, first["tokens"][:, :p], max_new_tokens=n, temperature=spec.temperature,
                     key=on_policy.rollout_key(jnp.int32(config.seed), jnp.int32(0)))
  np.testing.assert_array_equal(first["tokens"][:, :p + n], np.asarray(sampled.tokens))
  lines = [l for l in read_jsonl(tmp_path / "rkl" / "metrics.jsonl") if "loss" in l]
  assert len(lines) == STEPS and all(math.isfinite(l["loss"]) for l in lines)
  assert all(l["on_policy/fraction"] == 1.0 for l in lines)
  shares = [l["time/generate_fraction"] for l in lines if "time/generate_fraction" in l]
  assert len(shares) == STEPS - 1 and all(0.0 < s < 1.0 for s in shares)  # the compiling first step left out
  assert math.isfinite(summary["val_loss"]) and summary["kl_teacher"] > 0


def test_vmapped_gkd_seeds_draw_their_own_batches(teacher, tmp_path):
  config = _gkd("gkd", teacher)
  config.seed, config.vmap_seeds = 1, 2
  train(config, tmp_path / "gkd", use_wandb=False, progress=False)
  for seed in (1, 2):
    lines = [l for l in read_jsonl(tmp_path / "gkd" / f"seed{seed}" / "metrics.jsonl") if "loss" in l]
    drawn = [float(on_policy.is_on_policy(seed, l["step"] - 1, 0.5)) for l in lines]
    # The draws are a function of (seed, step) alone, so a resumed run redraws them (and the sampling keys).
    assert [l["on_policy/fraction"] for l in lines] == drawn and 0 < sum(drawn) < len(drawn)
    assert all(math.isfinite(l["loss"]) for l in lines)


# --- bad input --------------------------------------------------------------------------------------

def _fake_teacher(root: pathlib.Path) -> pathlib.Path:
  """A teacher run folder with a config.json and a checkpoint step (start-up reads only the config)."""
  (root / "checkpoints" / "1").mkdir(parents=True)
  spec = dict(name="gpt", vocab_size=256, d_model=32, num_layers=1, num_heads=2, max_len=32)
  (root / "config.json").write_text(json.dumps({"model": spec}))
  mark_finished(root)
  return root / "checkpoints"


@pytest.mark.parametrize("overrides, message", [
    (["--config.on_policy.fraction=1.5"], "config.on_policy.fraction=1.5: must be a number in [0, 1]"),
    (["--config.on_policy.fraction=-0.1"], "config.on_policy.fraction=-0.1: must be a number in [0, 1]"),
    (["--config.on_policy.max_new_tokens=0"], "config.on_policy.max_new_tokens=0: must be an int >= 1"),
    (["--config.on_policy.prompt_len=20", "--config.on_policy.max_new_tokens=16"],
     "config.on_policy: prompt longer than the model's context: prompt_len 20 + max_new_tokens 16 > the "
     "student's max_len=32"),
    (["--config.data.seq_len=24", "--config.on_policy.prompt_len=16"],
     "config.on_policy: prompt_len 16 + max_new_tokens 16 > config.data.seq_len=24"),
    (["--config.on_policy.temperature=-1.0"], "config.on_policy.temperature=-1.0: must be a number >= 0"),
])
def test_bad_on_policy_fields_are_one_line_errors_before_anything_is_written(tmp_path, capsys, overrides, message):
  teacher = _fake_teacher(tmp_path / "fake")
  workdir = tmp_path / "run"
  code = cli.main(["train", f"--config={GKD}:gkd,quick,teacher={teacher}", f"--workdir={workdir}", "--nowandb",
                   "--no-progress", *overrides])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("kdlab: error: ") and len(err.strip().splitlines()) == 1, err
  assert message in err
  assert not workdir.exists()


def test_on_policy_parse_rejects_unknown_fields_and_derives_the_prompt_length():
  config = ml_collections.ConfigDict(dict(on_policy=dict(fraction=1.0, max_new_tokens=8, temprature=1.0)))
  with pytest.raises(UserError, match=r"config.on_policy.temprature: unknown field"):
    on_policy.parse(config, max_len=32, seq_len=32)
  config = ml_collections.ConfigDict(dict(on_policy=dict(fraction=0.5, max_new_tokens=8)))
  assert on_policy.parse(config, max_len=32, seq_len=24) == on_policy.OnPolicy(0.5, 8, 1.0, 16, 24)
  assert on_policy.parse(ml_collections.ConfigDict(dict(on_policy=None)), max_len=32, seq_len=24) is None


# --- sequence-level KD: generate-data and training on it ---------------------------------------------

def test_generate_data_round_trip_and_training_on_it(teacher, tmp_path, capsys):
  out = tmp_path / "teacher_data"
  args = ["generate-data", f"--config={GKD}:seqkd,quick,steps={STEPS},teacher={teacher},gen={out}",
          f"--out={out}", "--no-progress", "--config.data.max_bytes=4096"]
  assert cli.main(args) == 0
  assert "generated data built: 128 sequences" in capsys.readouterr().out
  meta = json.loads((out / "meta.json").read_text())
  assert (meta["prompt_len"], meta["max_new_tokens"], meta["seq_len"]) == (16, 16, 32)
  tokens, targets, mask = (np.load(out / "data" / f"{n}.npy") for n in ("tokens", "targets", "mask"))
  from kdlab.data import text
  base = text.load_text("pysrc", "train", seq_len=32, max_bytes=4096).records
  np.testing.assert_array_equal(tokens[:, :16], base.tokens[:, :16])  # the training prompts
  np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
  assert set(np.unique(mask[:, 15:31])) == {1.0} and mask[:, :15].sum() == 0 and mask[:, 31].sum() == 0
  # Row i is the teacher's sample with fold_in(key(seed), i), whatever the batch size.
  from kdlab.offline.sample import load_lm
  model = load_lm(teacher.parent)
  i = 37
  row = generate(model, base.tokens[i:i + 1, :16], max_new_tokens=16, temperature=1.0,
                 key=jax.random.fold_in(jax.random.key(0), i)[None])
  np.testing.assert_array_equal(np.asarray(row.tokens[0]), tokens[i])  # prompt + 16 generated = 32 tokens

  before = tree_snapshot(out)
  assert cli.main(args) == 0  # the same dataset: kept, nothing rewritten
  assert "already exists" in capsys.readouterr().out and tree_snapshot(out) == before
  assert cli.main([*args, "--config.generate_data.temperature=0.5"]) == 2  # other settings: refused
  assert "holds a generated dataset of another teacher" in capsys.readouterr().err and tree_snapshot(out) == before

  config = load(f"{GKD}:seqkd,quick,steps={STEPS},teacher={teacher},gen={out}")
  summary = train(config, tmp_path / "seqkd", use_wandb=False, progress=False)
  losses = _losses(tmp_path / "seqkd")
  assert losses and all(math.isfinite(l) for l in losses)
  val = text.load_text("pysrc", "validation", seq_len=32, max_bytes=config.data.eval_max_bytes).records
  assert summary["val_tokens"] == val.num_tokens  # validated on pysrc's validation split


@pytest.mark.parametrize("overrides, message", [
    (["--config.generate_data.max_new_tokens=0"], "config.generate_data.max_new_tokens=0: must be an int >= 1"),
    (["--config.generate_data.prompt_len=30"],
     "config.generate_data: prompt longer than the model's context: prompt_len 30 + max_new_tokens 16 > the "
     "teacher's max_len=32"),
])
def test_generate_data_bad_input_writes_nothing(teacher, tmp_path, capsys, overrides, message):
  out = tmp_path / "data"
  code = cli.main(["generate-data", f"--config={GKD}:seqkd,quick,teacher={teacher}", f"--out={out}",
                   "--no-progress", *overrides])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
  assert not out.exists()


def test_seqkd_without_generated_data_is_a_start_up_error(tmp_path, capsys):
  teacher = _fake_teacher(tmp_path / "fake")
  code = cli.main(["train", f"--config={GKD}:seqkd,quick,teacher={teacher},gen={tmp_path / 'none'}",
                   f"--workdir={tmp_path / 'run'}", "--nowandb", "--no-progress"])
  err = capsys.readouterr().err
  assert code == 2 and "no finished generated dataset there; build it with kdlab generate-data" in err
  assert not (tmp_path / "run").exists()


# --- the sample-quality measure and length normalization ------------------------------------------------

def test_teacher_nll_of_samples_is_batch_independent_and_zero_gap_for_the_teacher_itself():
  student = registry.create("gpt", seed=0, **TINY)
  teacher = registry.create("gpt", seed=1, **TINY)
  prompts = np.asarray(jax.random.randint(jax.random.key(3), (5, 6), 0, 64), np.int32)
  a = on_policy.teacher_nll_of_samples(student, teacher, prompts, max_new_tokens=4, key=jax.random.key(2),
                                       batch_size=2)
  b = on_policy.teacher_nll_of_samples(student, teacher, prompts, max_new_tokens=4, key=jax.random.key(2),
                                       batch_size=8)
  assert a["tokens"] == b["tokens"] == 20
  assert a["teacher_nll"] == pytest.approx(b["teacher_nll"], rel=1e-6)
  # By hand: the teacher's NLL of the student's samples, token by token.
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(2), jnp.arange(5))
  gen = generate(student, prompts, max_new_tokens=4, key=keys)
  logp = jax.nn.log_softmax(teacher(gen.tokens, train=False)[0])
  nll = -np.mean([float(logp[r, c - 1, gen.tokens[r, c]]) for r in range(5) for c in range(6, 10)])
  assert a["teacher_nll"] == pytest.approx(nll, rel=1e-5)
  same = on_policy.teacher_nll_of_samples(teacher, teacher, prompts, max_new_tokens=4, key=jax.random.key(2),
                                          batch_size=2)
  assert same["teacher_nll"] == pytest.approx(same["student_nll"], rel=1e-6)


def test_length_normalize_false_sums_over_the_sequence_tokens():
  b, l, v = 3, 6, 8
  s = jax.random.normal(jax.random.key(0), (b, l, v))
  t = jax.random.normal(jax.random.key(1), (b, l, v))
  token_mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], jnp.float32)
  batch = {"targets": jnp.zeros((b, l), jnp.int32), "token_mask": token_mask, "index": jnp.arange(b),
           "mask": jnp.ones((b,), bool)}
  spec = lambda name, norm: dict(loss="reverse_kl", name=name, weight=1.0, length_normalize=norm)  # noqa: E731
  abstract = jax.ShapeDtypeStruct((b, l, v), jnp.float32)
  shapes = Shapes(ModelOutput(abstract, {}), [ModelOutput(abstract, {})], ["t0"], b,
                  {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in batch.items()})
  objective = objectives.build([spec("mean", True), spec("sum", False)], shapes, nnx.Rngs(0))
  inputs = StepInputs(ModelOutput(s, {}), [ModelOutput(t, {})], batch, jnp.int32(0), jax.random.key(0))
  weighted, _, _ = objective.term_losses({}, inputs, {})
  per_token = jnp.sum(jax.nn.softmax(s) * (jax.nn.log_softmax(s) - jax.nn.log_softmax(t)), -1)
  sums = jnp.sum(per_token * token_mask, -1)
  np.testing.assert_allclose(weighted["sum"], jnp.mean(sums), rtol=1e-5)
  np.testing.assert_allclose(weighted["mean"], jnp.mean(sums / token_mask.sum(-1)), rtol=1e-5)
  with pytest.raises(UserError, match="length_normalize='yes'"):
    objectives.build([spec("bad", "yes")], shapes, nnx.Rngs(0))
