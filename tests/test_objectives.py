import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdlab import losses, objective as objectives
from kdlab.errors import UserError
from kdlab.objective import ModelOutput, Shapes, StepInputs

from conftest import mark_finished


def _shapes(batch=4, classes=5, teacher_classes=5):
  s = ModelOutput(jax.ShapeDtypeStruct((batch, classes), jnp.float32),
                  {"pool": jax.ShapeDtypeStruct((batch, 8), jnp.float32)})
  t = ModelOutput(jax.ShapeDtypeStruct((batch, teacher_classes), jnp.float32),
                  {"pool": jax.ShapeDtypeStruct((batch, 16), jnp.float32)})
  return Shapes(s, [t], ["t0"], num_examples=100)


def _inputs(step=0):
  k1, k2 = jax.random.split(jax.random.key(0))
  s = ModelOutput(jax.random.normal(k1, (4, 5)), {})
  t = ModelOutput(jax.random.normal(k2, (4, 5)), {})
  batch = {"label": jnp.array([0, 1, 2, 3]), "mask": jnp.array([True, True, True, False]),
           "index": jnp.arange(4)}
  return StepInputs(s, [t], batch, jnp.asarray(step), jax.random.key(1))


def test_weighted_sum_with_masked_mean_and_metrics():
  obj = objectives.build([dict(loss="ce", weight=0.25), dict(loss="kd", weight=0.75, temperature=2.0)],
                         _shapes(), nnx.Rngs(0))
  inputs = _inputs()
  loss, metrics, _ = obj({}, inputs, {})
  mask = np.array([1, 1, 1, 0], np.float32)
  ce = np.asarray(losses.ce(inputs.student.logits, inputs.batch["label"]))
  kd = np.asarray(losses.kd(inputs.student.logits, inputs.teachers[0].logits, temperature=2.0))
  expected = 0.25 * (ce * mask).sum() / 3 + 0.75 * (kd * mask).sum() / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  s, c = metrics["distill/kd"]
  np.testing.assert_allclose(s / c, (kd * mask).sum() / 3, rtol=1e-6)
  assert float(metrics["task/ce"][1]) == 3.0


def test_scheduled_weight_follows_optax_schedule():
  obj = objectives.build([dict(loss="kd", temperature=1.0,
                               weight=dict(schedule="linear", init=0.0, end=2.0, steps=10))], _shapes(), nnx.Rngs(0))
  for step, w in [(0, 0.0), (5, 1.0), (20, 2.0)]:
    _, metrics, _ = obj({}, _inputs(step), {})
    np.testing.assert_allclose(metrics["weight/kd"][0], w, atol=1e-6)
  # Any optax schedule by name works too.
  obj = objectives.build([dict(loss="ce", weight=dict(schedule="cosine_decay", init_value=1.0, decay_steps=10))],
                         _shapes(), nnx.Rngs(0))
  _, metrics, _ = obj({}, _inputs(10), {})
  np.testing.assert_allclose(metrics["weight/ce"][0], 0.0, atol=1e-6)


def test_objective_jits_and_differentiates():
  obj = objectives.build([dict(loss="kd", temperature=4.0)], _shapes(), nnx.Rngs(0))
  inputs = _inputs()

  @jax.jit
  def f(s):
    return obj({}, StepInputs(ModelOutput(s, {}), inputs.teachers, inputs.batch, inputs.step, inputs.key), {})[0]

  g = jax.grad(f)(inputs.student.logits)
  assert np.all(np.isfinite(g)) and np.all(g[3] == 0)  # The masked example gets no gradient.


@pytest.mark.parametrize("spec, message", [
    (dict(loss="kdd"), r"config.objective\[0\]: unknown loss 'kdd'"),
    (dict(loss="kd", temperature=0.0), r"config.objective\[0\] \(kd\): temperature must be > 0"),
    (dict(loss="kd", temprature=2.0), r"\(kd\): unknown option\(s\) \['temprature'\]"),
    (dict(loss="kd", student="stage9"), r"\(kd\): student='stage9' is not a tap"),
    (dict(loss="kd", student="pool", teacher="pool"), r"\(kd\): student tap 'pool' .* differ in shape"),
    (dict(loss="kd", from_teacher="t7"), r"from_teacher='t7' names no teacher"),
    (dict(loss="ce", weight="lots"), r"config.objective\[0\].weight: expected a number"),
    (dict(loss="ce", weight=dict(schedule="zigzag")), r"unknown schedule 'zigzag'"),
])
def test_bad_terms_fail_at_build_naming_the_term(spec, message):
  with pytest.raises(UserError, match=message):
    objectives.build([spec], _shapes(), nnx.Rngs(0))


def test_teacher_with_other_class_count_is_rejected_by_logit_terms():
  with pytest.raises(UserError, match="differ in shape"):
    objectives.build([dict(loss="kd")], _shapes(teacher_classes=7), nnx.Rngs(0))


def test_duplicate_names_and_empty_objective():
  with pytest.raises(UserError, match="two terms are named 'kd'"):
    objectives.build([dict(loss="kd"), dict(loss="kd")], _shapes(), nnx.Rngs(0))
  objectives.build([dict(loss="kd"), dict(loss="kd", name="kd_t4", temperature=4.0)], _shapes(), nnx.Rngs(0))
  with pytest.raises(UserError, match="objective is empty"):
    objectives.build([], _shapes(), nnx.Rngs(0))


# --- eval-only teachers (docs/lm.md: loaded for the eval metrics, left out of the objective) ---------

def _teacher_dir(root, model: dict):
  """A teacher run folder: config.json and a checkpoint step (start-up reads only the config)."""
  (root / "checkpoints" / "1").mkdir(parents=True)
  (root / "config.json").write_text(json.dumps({"model": model}))
  mark_finished(root)
  return str(root / "checkpoints")


def test_terms_cannot_name_an_eval_only_teacher(tmp_path):
  from kdlab.config import load
  from kdlab.train.prepare import prepare
  from conftest import HINTON
  model = load(f"{HINTON}:teacher,source=digits,quick").model.to_dict()
  config = load(f"{HINTON}:kd,source=digits,quick")
  config.teachers = [dict(init=_teacher_dir(tmp_path / "a", model), name="t0"),
                     dict(init=_teacher_dir(tmp_path / "b", model), name="watch", eval_only=True)]
  setup = prepare(config)  # kd from teacher 0
  assert setup.objective_teachers == (0,) and list(setup.shapes.teacher_names) == ["t0"]
  assert [s["name"] for s in setup.teacher_specs] == ["t0", "watch"]  # both loaded: the eval step runs t0
  config.objective = [dict(loss="ce", weight=0.1), dict(loss="kd", weight=0.9, from_teacher="watch")]
  with pytest.raises(UserError, match=r"config.objective\[1\] \(kd\): from_teacher='watch' names no teacher; "
                                      r"teachers are \['t0'\]"):
    prepare(config)
  config.objective = [dict(loss="kd", from_teacher=1)]
  with pytest.raises(UserError, match=r"from_teacher=1 is out of range; there are 1 teachers"):
    prepare(config)
