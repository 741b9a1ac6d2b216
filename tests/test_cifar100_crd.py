"""configs/cifar100_crd.py: the CRD / DKD CIFAR-100 benchmark as configs, on mock CIFAR-100.

Every method trains 2 steps on one pair of the table (but ce, kd and crd, whose terms crd+kd trains);
every pair is built (its student, its teacher read from a checkpoint, the objective on their shapes)
and two of them (a same-architecture pair whose teacher was trained by its variant, and a
cross-architecture pair) train 2 steps with KD (``tfds.testing.mock_data``; real model sizes, batch 8).
Compiling these CIFAR networks costs 15-30 s per run on 2 cores, hence two: every model's forward and
backward are tests/test_zoo.py's. Teachers are random and saved directly (one is trained by its own variant).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from kdlab import losses, models, objective as objectives
from kdlab.config import load, load_python_file
from kdlab.errors import UserError
from kdlab.models import connectors
from kdlab.objective import ModelOutput, Shapes, StepInputs
from kdlab.train.checkpoint import Checkpointer
from kdlab.train.loop import train
from kdlab.train.state import Learner, init_state

from conftest import ROOT, mark_finished

CONFIG = ROOT / "configs" / "cifar100_crd.py"
crd = load_python_file(CONFIG, "test_cifar100_crd")
METHOD_PAIR = ("resnet32x4", "resnet8x4")  # Every method runs on this pair of the table.


def _config(variant: str):
  return load(f"{CONFIG}:{variant}")


def save_random_teacher(name: str, root: pathlib.Path) -> str:
  """A randomly initialised teacher saved as a finished run would be: ``root/checkpoints`` + config.json.

  Its state has the model's shapes (traced, not built) and is drawn by numpy: kernels normal with
  variance 1 / fan-in (flax's default), biases and BN means 0, BN scales and variances 1. Building the
  model eagerly would compile a random program per weight shape (10-20 s per CIFAR model on 2 cores).
  """
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps({"model": {"name": name, "num_classes": 100}}))
  shapes = jax.eval_shape(
      lambda: init_state(Learner(models.create(name, num_classes=100), {}), optax.identity(), {}, 0)[1])
  rng = np.random.default_rng(0)

  def draw(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    where = jax.tree_util.keystr(path)
    if not np.issubdtype(leaf.dtype, np.floating) or where.endswith(("['mean']", "['bias']")):
      return np.zeros(leaf.shape, leaf.dtype)
    if where.endswith(("['var']", "['scale']")):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
    return rng.normal(0.0, fan_in ** -0.5, leaf.shape).astype(leaf.dtype)

  state = jax.tree_util.tree_map_with_path(draw, shapes)
  ckpt = Checkpointer(root / "checkpoints")
  ckpt.save(1, state, {})
  ckpt.close()
  mark_finished(root)
  return str(root / "checkpoints")


@pytest.fixture(scope="module")
def mock_cifar():
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, mock_cifar):
  """``name -> checkpoints folder``, made on first use; vgg13 is trained 2 steps by its teacher variant."""
  root, made = tmp_path_factory.mktemp("teachers"), {}

  def get(name: str) -> str:
    if name not in made:
      if name == "vgg13":
        summary = train(_config("teacher-vgg13,mock"), root / name, use_wandb=False, progress=False)
        assert summary["steps"] == 2
        made[name] = str(root / name / "checkpoints")
      else:
        made[name] = save_random_teacher(name, root / name)
    return made[name]

  return get


def _flat(tree) -> dict[str, np.ndarray]:
  """``{"a/b/0": leaf}`` (orbax stores int keys as strings, so keys are compared as strings)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
  return {"/".join(name(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


def _train_cell(teacher: str, student: str, method: str, teacher_dirs, tmp_path: pathlib.Path) -> dict:
  """Trains the cell 2 steps; asserts every student parameter moved from its initialization."""
  config = _config(f"{teacher}-{student}-{method},mock,teacher={teacher_dirs(teacher)}")
  summary = train(config, tmp_path / "run", use_wandb=False, progress=False)
  assert summary["steps"] == 2 and summary["test_examples"] == 16
  assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["test_ce"])
  kwargs = config.model.to_dict()
  init = _flat(nnx.to_pure_dict(nnx.state(models.create(kwargs.pop("name"), seed=config.seed, **kwargs), nnx.Param)))
  trained = _flat(_saved_state(tmp_path / "run", 2)["params"]["student"])
  assert trained.keys() == init.keys()
  unchanged = [k for k in init if np.array_equal(init[k], trained[k])]
  assert not unchanged, f"{method}: 2 steps left {unchanged} at their initial values"
  return summary


def _saved_state(run: pathlib.Path, step: int) -> dict:
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "state")


# Methods whose terms crd+kd trains with the same specs (up to their weights), so whose train step is
# crd+kd's program less terms: ce (the term of every method), kd and crd. See test_methods_trained_within_crd_kd.
WITHIN_CRD_KD = ("ce", "kd", "crd")


@pytest.mark.parametrize("method", [m for m in crd.METHODS if m not in WITHIN_CRD_KD])
def test_every_method_trains_two_steps(method, teacher_dirs, tmp_path):
  _train_cell(*METHOD_PAIR, method, teacher_dirs, tmp_path)
  logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  names = {k for m in logged for k in m}
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  for term in config["objective"]:
    name = term.get("name", term["loss"])
    assert any(n.endswith("/" + name) for n in names), (name, sorted(names))
  if "crd" in method:  # The memory bank moved: the rows of the examples seen, and Z was fixed on the first step.
    from kdlab.train.prepare import prepare
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
      init = prepare(_config(f"{METHOD_PAIR[0]}-{METHOD_PAIR[1]}-{method},mock,teacher={teacher_dirs(METHOD_PAIR[0])}"))
    bank = init.objective.init_state()["crd"]
    saved = _saved_state(tmp_path / "run", 2)["term_states"]["crd"]
    saved = dict(zip(bank._fields, saved)) if isinstance(saved, (list, tuple)) else saved
    for side in ("memory_s", "memory_t"):
      moved = np.any(np.asarray(saved[side]) != np.asarray(getattr(bank, side)), axis=-1)
      assert moved.sum() >= 8, (side, moved)  # two batches of 8 of the 16 examples
    assert float(bank.z_s) == -1.0 and float(saved["z_s"]) > 0 and float(saved["z_t"]) > 0


def test_methods_trained_within_crd_kd():
  """Each term of ce, kd and crd is a term of crd+kd but for its weight (their cells are not trained)."""
  unweighted = lambda m: [{k: v for k, v in t.items() if k != "weight"}  # noqa: E731
                          for t in _config(f"{METHOD_PAIR[0]}-{METHOD_PAIR[1]}-{m},mock").objective]
  for method in WITHIN_CRD_KD:
    assert unweighted(method) and all(t in unweighted("crd+kd") for t in unweighted(method)), method


@pytest.mark.parametrize("pair", [p for p in crd.PAIRS if p != METHOD_PAIR], ids="-".join)
def test_every_pair_builds_with_its_teacher_checkpoint(pair, teacher_dirs):
  from kdlab.train.prepare import prepare
  from kdlab.train.teachers import load_teachers
  teacher, student = pair
  setup = prepare(_config(f"{teacher}-{student}-kd,mock,teacher={teacher_dirs(teacher)}"))
  assert setup.config.model.name == student and setup.teacher_specs[0]["model"]["name"] == teacher
  assert setup.shapes.student.logits.shape[-1] == setup.shapes.teachers[0].logits.shape[-1] == 100
  _, variables = load_teachers(setup.teacher_specs, setup.mesh)
  assert jax.tree.leaves(variables)


@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("ResNet50", "vgg8")], ids="-".join)
def test_pairs_train_kd_two_steps(pair, teacher_dirs, tmp_path):
  _train_cell(*pair, "kd", teacher_dirs, tmp_path)


def test_the_variants_are_the_benchmark():
  assert len(crd.SAME_ARCH) == 7 and len(crd.CROSS_ARCH) == 6 and len(crd.METHODS) == 16
  names = crd.variants()
  # 6 teachers; 13 pairs x 16 methods less FSP where the paper has none (WRN-40-2 -> WRN-40-1, Table 2).
  assert len(names) == 6 + 13 * 16 - 7 == len(set(names))
  for name in names:
    config = _config(name)
    model = config.model.name
    assert config.data.source == "tfds:cifar100" and config.data.batch_size == 64
    assert config.data.augment == "crop_flip" and config.optimizer.weight_decay == 5e-4
    assert config.optimizer.momentum == 0.9 and config.optimizer.schedule == "piecewise"
    assert config.optimizer.learning_rate == (0.01 if model in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
    init = 30 if name.split("-")[-1] in ("ab", "fsp", "ft") else 0
    assert config.train.num_epochs == 240 + init
    assert list(config.optimizer.boundaries_epochs) == [150 + init, 180 + init, 210 + init]
    if name.startswith("teacher-") or name.endswith("-ce"):
      assert config.objective == [dict(loss="ce", weight=1.0)]
    if not name.startswith("teacher-") and not name.endswith("-ce"):
      assert config.teachers[0]["init"] == f"runs/cifar100/teacher-{name.split('-')[0]}/checkpoints"


def test_repdistiller_weights():
  terms = lambda v: [dict(t) for t in _config(f"resnet32x4-resnet8x4-{v}").objective]
  assert terms("kd") == [dict(loss="ce", weight=0.1), dict(loss="kd", weight=0.9, temperature=4.0)]
  assert terms("vanilla") == terms("ce")
  weights = {m: {t["loss"]: t["weight"] for t in terms(m)} for m in crd.METHODS if m not in ("ab", "fsp", "dkd")}
  assert weights["fitnet"] == {"ce": 1.0, "fitnet": 100.0} and weights["at"] == {"ce": 1.0, "at": 1000.0}
  assert weights["sp"]["sp"] == 3000.0 and weights["cc"]["cc"] == 0.02 and weights["vid"]["vid"] == 1.0
  assert weights["rkd"] == {"ce": 1.0, "rkd_distance": 25.0, "rkd_angle": 50.0}
  assert weights["pkt"]["pkt"] == 30000.0 and weights["ft"]["ft"] == 200.0 and weights["nst"]["nst"] == 50.0
  assert weights["crd"] == {"ce": 1.0, "crd": 0.8} and weights["crd+kd"] == {"ce": 1.0, "kd": 1.0, "crd": 0.8}
  (crd_term,) = [t for t in terms("crd") if t["loss"] == "crd"]
  assert (crd_term["num_negatives"], crd_term["temperature"], crd_term["feat_dim"], crd_term["momentum"]) == (
      16384, 0.07, 128, 0.5)
  assert terms("at")[1]["student"] == ["stage1", "stage2", "stage3"] and "pool" not in terms("at")[1]
  cross = _config("vgg13-MobileNetV2-at").objective[1]
  assert cross["student"] == ["stage1", "stage2", "stage3", "stage4"] and cross["pool"] is True
  assert terms("sp")[1]["student"] == "stage3" and terms("fitnet")[1]["student"] == "stage2"


def test_dkd_follows_mdistiller():
  betas = {pair: _config(f"{pair[0]}-{pair[1]}-dkd").objective[1]["beta"] for pair in crd.PAIRS}
  assert betas[("resnet32x4", "resnet8x4")] == 8.0 and betas[("resnet56", "resnet20")] == 2.0
  assert betas[("vgg13", "vgg8")] == 6.0 and betas[("vgg13", "MobileNetV2")] == 6.0
  ce, dkd = _config("resnet32x4-resnet8x4-dkd").objective
  assert ce["weight"] == 1.0 and (dkd["alpha"], dkd["temperature"]) == (1.0, 4.0)
  weight = objectives.make_schedule(dkd["weight"], "w")
  steps_per_epoch = 50_000 // 64
  # mdistiller: min(epoch / 20, 1) with epochs counted from 1.
  for epoch in (1, 2, 10, 20, 21, 200):
    assert float(weight((epoch - 1) * steps_per_epoch)) == pytest.approx(min(epoch / 20, 1.0), rel=1e-5)


def test_init_stages():
  steps = 30 * (50_000 // 64)
  ab = _config("resnet32x4-resnet8x4-ab")
  assert ab.connector_warmup_steps == 0
  weight = lambda term, step: float(objectives.make_schedule(term["weight"], "w")(step))
  ce, *ab_terms = ab.objective
  assert [t["student"] for t in ab_terms] == ["stage1_preact", "stage2_preact", "stage3_preact"]
  assert [weight(t, 0) for t in ab_terms] == pytest.approx([0.00075, 0.0015, 0.003])
  assert [weight(t, steps) for t in ab_terms] == [0.0, 0.0, 0.0]
  assert (weight(ce, steps - 1), weight(ce, steps)) == (0.0, 1.0)
  ce, fsp = _config("resnet56-resnet20-fsp").objective
  assert fsp["student"] == [["stem", "stage1"], ["stage1", "stage2"], ["stage2", "stage3"]]
  assert (weight(fsp, steps - 1), weight(fsp, steps), weight(ce, steps)) == (1.0, 0.0, 1.0)
  ft = _config("resnet32x4-resnet8x4-ft")
  assert ft.connector_warmup_steps == steps and ft.objective[1]["weight"] == 200.0
  mock = _config("resnet32x4-resnet8x4-ab,mock")
  assert (mock.train.num_steps, mock.data.batch_size) == (2, 8)
  assert weight(mock.objective[1], 0) > 0 and weight(mock.objective[1], 1) == 0.0


@pytest.mark.parametrize("variant, message", [
    ("resnet32x4-resnet20-kd", "not a pair of the benchmark"),
    ("resnet32x4-resnet8x4-hint", "unknown method 'hint'"),
    ("wrn_40_2-wrn_40_1-fsp", "fsp does not apply"),
    ("resnet32x4-ShuffleV1-fsp", "fsp does not apply"),
    ("teacher-resnet8x4", "unknown teacher"),
    ("resnet32x4-resnet8x4-kd,batch=0", "batch=0"),
    ("resnet32x4-resnet8x4-kd,epochs=3", "unknown option 'epochs'"),
])
def test_bad_variants_are_one_line_errors(variant, message):
  with pytest.raises(UserError, match=message):
    _config(variant)


def test_missing_teacher_checkpoint_is_refused(mock_cifar, tmp_path):
  with pytest.raises(UserError, match=r"no teacher checkpoint"):
    train(_config(f"resnet32x4-resnet8x4-kd,mock,teacher={tmp_path}/none"), tmp_path / "run", use_wandb=False,
          progress=False)
  assert not (tmp_path / "run").exists()


# --- the terms' pool option and AB's resizing connector, used by the cross-architecture pairs.

def _shapes(s_feats: dict, t_feats: dict) -> Shapes:
  out = lambda feats: ModelOutput(jax.ShapeDtypeStruct((4, 10), jnp.float32),
                                  {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in feats.items()})
  return Shapes(out(s_feats), [out(t_feats)], ["t0"], num_examples=8)


def _pool(x, size):
  b, h, w, c = x.shape
  return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def test_pool_option_matches_pooling_by_hand():
  rng = np.random.default_rng(0)
  s_map, t_map = rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.normal(size=(4, 4, 4, 5)).astype(np.float32)
  shapes = _shapes({"a": s_map.shape}, {"a": t_map.shape})
  inputs = StepInputs(ModelOutput(jnp.zeros((4, 10)), {"a": s_map}), [ModelOutput(jnp.zeros((4, 10)), {"a": t_map})],
                      {"label": jnp.zeros(4, jnp.int32), "mask": jnp.ones(4, bool), "index": jnp.arange(4)},
                      jnp.asarray(0), jax.random.key(0))
  for loss, fn in (("at", losses.at), ("nst", losses.nst)):
    with pytest.raises(UserError, match="differ in spatial size"):
      objectives.build([dict(loss=loss, student="a")], shapes, nnx.Rngs(0))
    obj = objectives.build([dict(loss=loss, student="a", pool=True)], shapes, nnx.Rngs(0))
    value = jax.jit(lambda: obj({}, inputs, {})[0])()
    np.testing.assert_allclose(value, fn(_pool(s_map, 4), t_map).mean(), rtol=1e-5)
  with pytest.raises(UserError, match="pool must be True or False"):
    objectives.build([dict(loss="at", student="a", pool="yes")], shapes, nnx.Rngs(0))
  obj = objectives.build([dict(loss="ft", student="a", pool=True)], shapes, nnx.Rngs(0))
  assert np.isfinite(float(nnx.jit(lambda conns: obj(conns, inputs, {})[0])(obj.connectors())))
  # AB between maps of different sizes: RepDistiller's ConvReg without its ReLU (4x4 -> 8x8 here).
  ab = objectives.build([dict(loss="ab", student="a")], _shapes({"a": (4, 4, 4, 5)}, {"a": (4, 8, 8, 3)}),
                        nnx.Rngs(0))
  (conn,) = ab.connectors().values()
  assert isinstance(conn[0], connectors.FitNetRegressor) and conn[0].relu is False
  out = nnx.jit(lambda c: c[0](jnp.full((4, 4, 4, 5), -3.0), train=True))(conn)
  assert out.shape == (4, 8, 8, 3) and out.min() < 0  # no ReLU: signs survive
