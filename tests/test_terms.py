"""Every objective term from config: built against real tap shapes, its gradient w.r.t. the student's
outputs equal to that of its standalone ``kdlab.losses`` function (and non-zero), trained through the
real train step until its loss falls; start-up errors name the term; per-term gradient norms; the
connector warm-up; CRD's memory bank.

A tiny two-stage CNN with one attention layer stands in for the zoo (it has every tap kind: NHWC
stages, pre-activations, a pooled vector, attention probabilities and values). The student is
half as wide as the "wide" teacher, so every connector has a shape to bridge; the "same" teacher
matches the student's widths (FSP compares channel counts). Terms are trained in a few groups so
that only a few train steps are compiled.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdlab import losses, models, objective as objectives
from kdlab.errors import UserError
from kdlab.objective import ModelOutput, Shapes, StepInputs
from kdlab.train.state import Learner, init_state
from kdlab.train.step import Teacher, make_train_step

NUM_EXAMPLES, NUM_CLASSES, STEPS = 16, 10, 25


class TinyNet(nnx.Module):
  """``[B, 8, 8, 3] -> logits [B, 10]``; feats: stem, stage1(_preact) ``[B, 8, 8, w]``,
  stage2(_preact) ``[B, 4, 4, 2w]``, attn ``[B, 2, 16, 16]``, values ``[B, 2, 16, w]``, pool ``[B, 2w]``."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    w = width
    self.stem = nnx.Conv(3, w, (3, 3), rngs=rngs)
    self.conv1, self.bn1 = nnx.Conv(w, w, (3, 3), rngs=rngs), nnx.BatchNorm(w, rngs=rngs)
    self.conv2, self.bn2 = nnx.Conv(w, 2 * w, (3, 3), strides=2, rngs=rngs), nnx.BatchNorm(2 * w, rngs=rngs)
    self.qkv = nnx.Linear(2 * w, 6 * w, rngs=rngs)
    self.fc = nnx.Linear(2 * w, NUM_CLASSES, rngs=rngs)

  def __call__(self, x, *, train):
    feats = {}
    h = feats["stem"] = nnx.relu(self.stem(x))
    pre = feats["stage1_preact"] = self.bn1(self.conv1(h), use_running_average=not train) + h
    h = feats["stage1"] = nnx.relu(pre)
    pre = feats["stage2_preact"] = self.bn2(self.conv2(h), use_running_average=not train)
    h = feats["stage2"] = nnx.relu(pre)
    tokens = h.reshape(h.shape[0], -1, h.shape[-1])
    q, k, v = (a.reshape(*a.shape[:2], 2, -1).swapaxes(1, 2) for a in jnp.split(self.qkv(tokens), 3, -1))
    probs = feats["attn"] = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]))
    feats["values"] = v
    out = (probs @ v).swapaxes(1, 2).reshape(tokens.shape)
    pool = feats["pool"] = jnp.mean(tokens + out, axis=1)
    return self.fc(pool), feats


def _models():
  return TinyNet(4, rngs=nnx.Rngs(0)), {"wide": TinyNet(8, rngs=nnx.Rngs(1)), "same": TinyNet(4, rngs=nnx.Rngs(2))}


def _batch():
  kx, ky = jax.random.split(jax.random.key(42))
  return {"image": jax.random.normal(kx, (NUM_EXAMPLES, 8, 8, 3)),
          "label": jax.random.randint(ky, (NUM_EXAMPLES,), 0, NUM_CLASSES),
          "index": jnp.arange(NUM_EXAMPLES, dtype=jnp.int32), "mask": jnp.ones(NUM_EXAMPLES, bool)}


def _shapes(student, teachers) -> Shapes:
  x = jax.ShapeDtypeStruct((NUM_EXAMPLES, 8, 8, 3), jnp.float32)

  def out(m):
    return jax.eval_shape(lambda m, x: ModelOutput(*m(x, train=False)), m, x)

  return Shapes(out(student), [out(t) for t in teachers.values()], list(teachers), NUM_EXAMPLES)


def _build(specs):
  student, teachers = _models()
  return objectives.build(specs, _shapes(student, teachers), nnx.Rngs(7))


def _train(specs, *, steps=STEPS, lr=1e-2, **step_options):
  """Trains on the fixed batch; returns per-step metric values and the params after each step."""
  student, teachers = _models()
  objective = objectives.build(specs, _shapes(student, teachers), nnx.Rngs(7))
  tx = optax.adam(lr)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  t_graphs, t_vars = [], []
  for name, model in teachers.items():
    g, params, rest = nnx.split(model, nnx.Param, ...)
    t_graphs.append(Teacher(name, g))
    t_vars.append((nnx.to_pure_dict(params), nnx.to_pure_dict(rest)))
  step = jax.jit(make_train_step(graphdef, objective, tx, t_graphs, **step_options))
  batch = _batch()
  history, params = [], [state.params]
  for _ in range(steps):
    state, metrics = step(state, t_vars, batch)
    history.append({k: float(s / c) for k, (s, c) in metrics.items() if np.ndim(s) == 0})
    params.append(state.params)
  return history, params


# Every term, in groups trained together (one compiled step per group). Weights bring the terms'
# gradients to a similar scale (the papers' weights do the same for CIFAR).
GROUPS = {
    "logits": [
        dict(loss="kd", temperature=4.0),
        dict(loss="reverse_kl", temperature=2.0),
        dict(loss="jsd", beta=0.3, temperature=2.0),
        dict(loss="tvd", temperature=2.0),
        dict(loss="dkd", alpha=1.0, beta=2.0, temperature=4.0),
        dict(loss="logit_l2"),
        dict(loss="hard_ce", label_smoothing=0.1),
        dict(loss="top_k_agreement", weight=0.0, k=1),
    ],
    "connectors": [
        dict(loss="fitnet", student="stage1", teacher="stage1"),                  # equal size: 1x1 conv
        dict(loss="fitnet", name="fitnet_down", student="stage1", teacher="stage2"),  # strided conv
        dict(loss="fitnet", name="fitnet_up", student="stage2", teacher="stage1"),    # transposed conv
        dict(loss="fitnet", name="fitnet_vec", student="pool", teacher="pool"),       # linear
        dict(loss="vid", weight=0.1, init_var=1.0, student=["stage1", "stage2"], teacher=["stage1", "stage2"]),
        dict(loss="ab", weight=0.01, student=["stage1_preact", "stage2_preact"]),
        dict(loss="ft", student="stage2", teacher="stage2"),
    ],
    "relations": [
        dict(loss="sp", weight=100.0, student="stage2", teacher="stage2"),
        dict(loss="rkd_distance", weight=10.0),
        dict(loss="rkd_angle", weight=10.0),
        dict(loss="pkt", weight=10000.0),
        dict(loss="cc", feat_dim=16),
        dict(loss="crd", weight=0.1, feat_dim=16, temperature=0.1),
        dict(loss="info_nce", feat_dim=16),
    ],
    "maps": [
        dict(loss="nst", weight=10.0, student=["stage1", "stage2"]),
        dict(loss="at", weight=100.0, student=["stage1", "stage2"], p=2),
        dict(loss="fsp", weight=10.0, student=[["stem", "stage1"], ["stage1", "stage2"]], from_teacher="same"),
        dict(loss="attention_kl", student="attn", teacher="attn"),
        dict(loss="value_relation", student="values", teacher="values"),
    ],
}
GROUP_OPTIONS = {"logits": dict(term_grad_norms=True), "connectors": dict(connector_warmup_steps=3)}
TERMS = [(group, spec.get("name", spec["loss"])) for group, specs in GROUPS.items() for spec in specs]


@pytest.fixture(scope="module")
def runs():
  return {group: _train(specs, **GROUP_OPTIONS.get(group, {})) for group, specs in GROUPS.items()}


def test_every_registered_term_is_trained_here():
  trained = {spec["loss"] for specs in GROUPS.values() for spec in specs}
  # topk_kd reads a language model's teacher cache: trained in tests/test_teacher_cache.py; uld and
  # aligned_kd read a second tokenization: trained and gradient-checked in tests/test_cross_tokenizer.py.
  assert set(objectives.term_names()) - {"ce", "topk_kd", "uld", "aligned_kd"} == trained


@pytest.mark.parametrize("group, name", [t for t in TERMS if t[1] != "top_k_agreement"])
def test_term_loss_falls_in_training(runs, group, name):
  history, _ = runs[group]
  key = f"distill/{name}"
  first, last = history[0][key], np.mean([h[key] for h in history[-3:]])
  assert np.isfinite(first) and np.isfinite(last)
  assert last < first - 0.05 * abs(first), (name, [round(h[key], 5) for h in history])


# --- each term's gradient is that of its standalone loss -------------------------------------------

def _pairs_sum(fn, s_taps, t_taps):
  return sum(fn(s, t) for s, t in zip(s_taps, t_taps))


def _standalone(name: str, conn, s: ModelOutput, t: dict, batch, key, state) -> jax.Array:
  """The term's per-example loss ``[B]`` straight from ``kdlab.losses`` (through its connector, if any)."""
  w, same, label = t["wide"], t["same"], batch["label"]
  sf, wf = s.feats, w.feats
  logit = {"kd": lambda: losses.kd(s.logits, w.logits, temperature=4.0),
           "reverse_kl": lambda: losses.reverse_kl(s.logits, w.logits, temperature=2.0),
           "jsd": lambda: losses.jsd(s.logits, w.logits, beta=0.3, temperature=2.0),
           "tvd": lambda: losses.tvd(s.logits, w.logits, temperature=2.0),
           "dkd": lambda: losses.dkd(s.logits, w.logits, label, alpha=1.0, beta=2.0, temperature=4.0),
           "logit_l2": lambda: losses.logit_l2(s.logits, w.logits),
           "hard_ce": lambda: losses.hard_ce(s.logits, w.logits, label_smoothing=0.1),
           "ce": lambda: losses.ce(s.logits, label)}
  if name in logit:
    return logit[name]()
  fitnet = {"fitnet": ("stage1", "stage1"), "fitnet_down": ("stage1", "stage2"), "fitnet_up": ("stage2", "stage1"),
            "fitnet_vec": ("pool", "pool")}
  if name in fitnet:
    a, b = fitnet[name]
    return losses.fitnet(conn[0](sf[a], train=True), wf[b])
  taps2 = ("stage1", "stage2")
  if name == "vid":
    return sum(losses.vid(conn[i](sf[k], train=True), wf[k], log_scale=conn[i].log_scale[...])
               for i, k in enumerate(taps2))
  if name == "ab":
    return sum(losses.ab(conn[i](sf[k], train=True), wf[k]) for i, k in enumerate(("stage1_preact", "stage2_preact")))
  if name == "ft":  # (+ the paraphraser's reconstruction error, which does not depend on the student)
    ft = conn[0]
    return losses.ft(ft.translator(sf["stage2"], train=True),
                     jax.lax.stop_gradient(ft.paraphraser.encode(wf["stage2"], train=True)))
  if name in ("cc", "info_nce"):
    return getattr(losses, name)(conn[0].student(sf["pool"], train=True), conn[0].teacher(wf["pool"], train=True))
  if name == "crd":
    return losses.crd(conn.student(sf["pool"], train=True), conn.teacher(wf["pool"], train=True), batch["index"],
                      state, key=key, num_negatives=NUM_EXAMPLES - 1, temperature=0.1)[0]
  if name in ("sp", "rkd_distance", "rkd_angle", "pkt"):
    tap = "stage2" if name == "sp" else "pool"
    return getattr(losses, name)(sf[tap], wf[tap])
  if name in ("nst", "at"):
    fn = losses.nst if name == "nst" else functools.partial(losses.at, p=2)
    return _pairs_sum(fn, [sf[k] for k in taps2], [wf[k] for k in taps2])
  if name == "fsp":
    return sum(losses.fsp((sf[a], sf[b]), (same.feats[a], same.feats[b])) for a, b in (("stem", "stage1"), taps2))
  if name in ("attention_kl", "value_relation"):
    tap = "attn" if name == "attention_kl" else "values"
    return getattr(losses, name)(sf[tap], wf[tap])
  raise KeyError(name)


GRADIENT_TERMS = [(name, spec) for specs in GROUPS.values() for spec in specs
                  if (name := spec.get("name", spec["loss"])) != "top_k_agreement"] + [("ce", dict(loss="ce"))]


@pytest.fixture(scope="module")
def outputs():
  """The tiny models' outputs on the batch: the student's ``ModelOutput`` and the teachers' by name."""
  student, teachers = _models()
  run = nnx.jit(lambda m, x: ModelOutput(*m(x, train=False)))
  x = _batch()["image"]
  return run(student, x), {name: run(model, x) for name, model in teachers.items()}


def test_every_term_is_in_the_gradient_check():
  assert {spec["loss"] for _, spec in GRADIENT_TERMS} == (set(objectives.term_names())
                                                          - {"top_k_agreement", "topk_kd", "uld", "aligned_kd"})


@pytest.mark.parametrize("name, spec", GRADIENT_TERMS, ids=[n for n, _ in GRADIENT_TERMS])
def test_term_gradient_is_the_weighted_standalone_loss_gradient(outputs, name, spec):
  """d(objective)/d(student outputs) of the term alone = d(weight * mean(standalone loss)), and is non-zero."""
  s_out, t_outs = outputs
  objective = _build([spec])
  (term,) = objective.terms
  batch, key = _batch(), jax.random.key(5)
  graphdef, variables = nnx.split(term.connector) if term.connector is not None else (None, None)
  states = objective.init_state()

  def through_objective(s, variables):
    conns = {} if graphdef is None else {term.name: nnx.merge(graphdef, variables)}
    inputs = StepInputs(s, list(t_outs.values()), batch, jnp.zeros((), jnp.int32), key)
    return objective(conns, inputs, states)[0]

  def standalone(s, variables):
    conn = None if graphdef is None else nnx.merge(graphdef, variables)
    (term_key,) = jax.random.split(key, 1)  # The objective gives each term its own key.
    per_example = _standalone(name, conn, s, t_outs, batch, term_key, states.get(name))
    return spec.get("weight", 1.0) * jnp.mean(per_example)

  # Differentiated w.r.t. the connector too (as the train step does), so its batch statistics may update.
  grads = lambda f: lambda s, v: jax.grad(f, argnums=(0, 1))(s, v)[0]  # noqa: E731
  got, want = jax.jit(lambda s, v: (grads(through_objective)(s, v), grads(standalone)(s, v)))(s_out, variables)
  assert float(optax.tree.norm(got)) > 0, f"{name}: no gradient reaches the student"
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(w).max())), err_msg=name)


def test_agreement_is_a_metric_that_rises_under_distillation(runs):
  history, _ = runs["logits"]
  values = [h["agreement/top_k_agreement"] for h in history]
  assert values[-1] >= values[0] and values[-1] > 0.5, values
  assert all(h["weight/top_k_agreement"] == 0.0 for h in history)


def test_term_grad_norms_only_when_enabled(runs):
  history, _ = runs["logits"]
  for spec in GROUPS["logits"]:
    assert f"grad_norm/{spec['loss']}" in history[0]
  assert history[0]["grad_norm/kd"] > 0 and history[0]["grad_norm/top_k_agreement"] == 0.0
  # The terms' gradients sum to the total one (no connectors here): the triangle inequality holds.
  for h in history[:3]:
    assert h["l2_grads"] <= 1.0001 * sum(h[f"grad_norm/{spec['loss']}"] for spec in GROUPS["logits"])
  for group in ("connectors", "relations", "maps"):
    assert not any(k.startswith("grad_norm/") for k in runs[group][0][0])


def test_connector_warmup_freezes_the_student_only(runs):
  _, params = runs["connectors"]

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  for i in (1, 2, 3):  # The first 3 steps move only the connectors.
    assert same(params[i]["student"], params[0]["student"])
    assert not same(params[i]["connectors"], params[i - 1]["connectors"])
  assert not same(params[4]["student"], params[3]["student"])


def test_crd_carries_its_memory_bank():
  objective = _build([dict(loss="crd", feat_dim=8)])
  (term,) = objective.terms
  assert term.state.memory_s.shape == (NUM_EXAMPLES, 8) and float(term.state.z_s) == -1.0
  assert set(objective.connectors()) == {"crd"}


def test_crd_memory_bank_moves_in_training():
  """Two train steps on the 16 examples: every bank row moved (rows of the batch's ``index``), Z was fixed."""
  student, teachers = _models()
  objective = objectives.build([dict(loss="crd", feat_dim=8, temperature=0.1)], _shapes(student, teachers),
                               nnx.Rngs(7))
  tx = optax.adam(1e-2)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  t_graph, params, rest = nnx.split(teachers["wide"], nnx.Param, ...)
  step = jax.jit(make_train_step(graphdef, objective, tx, [Teacher("wide", t_graph)]))
  bank = objective.init_state()["crd"]
  batch = _batch()
  half = {k: v[:8] for k, v in batch.items()}  # examples 0..7 only
  state, _ = step(state, [(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))], half)
  after = state.term_states["crd"]
  for side in ("memory_s", "memory_t"):
    moved = np.any(np.asarray(getattr(after, side)) != np.asarray(getattr(bank, side)), axis=-1)
    np.testing.assert_array_equal(moved, np.arange(NUM_EXAMPLES) < 8, err_msg=side)
  assert float(bank.z_s) == -1.0 and float(after.z_s) > 0 and float(after.z_t) > 0


@pytest.mark.parametrize("spec, message", [
    (dict(loss="fitnett"), r"config.objective\[0\]: unknown loss 'fitnett'"),
    (dict(loss="at", student="stage9"), r"\(at\): student='stage9' is not a tap"),
    (dict(loss="nst", student="stage1", teacher="stage9"), r"\(nst\): teacher='stage9' is not a tap"),
    (dict(loss="at", student="stage1", teacher="stage2"),
     r"\(at\): student tap 'stage1' \(16, 8, 8, 4\) and teacher tap 'stage2' \(16, 4, 4, 16\): differ in spatial"),
    (dict(loss="fsp", student=("stem", "stage1")),
     r"\(fsp\): student taps \['stem', 'stage1'\] .* FSP matrices \[C1, C2\] differ"),
    (dict(loss="fitnet", student="pool", teacher="stage1"), r"\(fitnet\): student tap 'pool' .* teacher tap 'stage1'"),
    (dict(loss="ab", student=["stage1_preact"], teacher=["stage1_preact", "stage2_preact"]),
     r"\(ab\): student=.* must list as many taps"),
    (dict(loss="attention_kl", student="attn", teacher="values"), r"\(attention_kl\): student tap 'attn'"),
    (dict(loss="ft", student="stage1", teacher="stage2"), r"\(ft\): student tap 'stage1' .* differ in spatial"),
    (dict(loss="sp"), r"\(sp\): this loss compares features: give student=TAP"),
    (dict(loss="fitnet", student="stage1", hint=3), r"\(fitnet\): unknown option\(s\) \['hint'\]"),
    (dict(loss="jsd", temperature=0.0), r"\(jsd\): temperature must be > 0"),
    (dict(loss="tvd", temperature=-1.0), r"\(tvd\): temperature must be > 0"),
    (dict(loss="reverse_kl", temperature=0), r"\(reverse_kl\): temperature must be > 0"),
    (dict(loss="dkd", temperature=0.0), r"\(dkd\): temperature must be > 0"),
    (dict(loss="crd", temperature=0.0), r"\(crd\): temperature must be > 0"),
    (dict(loss="info_nce", temperature=-0.1), r"\(info_nce\): temperature must be > 0"),
    (dict(loss="jsd", beta=1.0), r"\(jsd\): beta must be in \(0, 1\)"),
    (dict(loss="jsd", beta=0.0), r"\(jsd\): beta must be in \(0, 1\)"),
    (dict(loss="crd", num_negatives=0), r"\(crd\): num_negatives must be > 0"),
    (dict(loss="crd", num_negatives=-5), r"\(crd\): num_negatives must be > 0"),
    (dict(loss="crd", num_negatives=16), r"\(crd\): num_negatives=16 must be < the 16 training examples"),
    (dict(loss="crd", feat_dim=0), r"\(crd\): feat_dim must be > 0"),
    (dict(loss="crd", momentum=1.0), r"\(crd\): momentum must be in \[0, 1\)"),
    (dict(loss="cc", gamma=0.0), r"\(cc\): gamma must be > 0"),
    (dict(loss="pkt", eps=0.0), r"\(pkt\): eps must be > 0"),
    (dict(loss="ab", student="stage1_preact", margin=-1.0), r"\(ab\): margin must be > 0"),
    (dict(loss="at", student="stage1", p=0), r"\(at\): p must be > 0"),
    (dict(loss="ft", student="stage2", p=0), r"\(ft\): p must be > 0"),
    (dict(loss="vid", student="stage1", eps=0.0), r"\(vid\): eps must be > 0"),
    (dict(loss="info_nce", feat_dim=None),
     r"\(info_nce\): student tap 'pool' .* the flattened taps must have the same size"),
])
def test_bad_terms_fail_at_start_up_naming_the_term(spec, message):
  with pytest.raises(UserError, match=message):
    _build([spec])


def test_connector_warmup_steps_is_validated():
  with pytest.raises(UserError, match="connector_warmup_steps must be an int >= 0"):
    make_train_step(None, None, optax.sgd(0.1), [], connector_warmup_steps=-1)


def test_feature_terms_build_on_zoo_shapes():
  """The connectors bridge real zoo shapes (abstractly: nothing is compiled or run)."""
  pytest.importorskip("kdlab.models.zoo")
  x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)

  def out(name):
    model = nnx.eval_shape(lambda: models.create(name, num_classes=100))
    return jax.eval_shape(lambda m, x: ModelOutput(*m(x, train=False)), model, x)

  shapes = Shapes(out("resnet8"), [out("resnet8x4"), out("resnet14")], ["wide", "deep"], 50_000)
  specs = [dict(loss="fitnet", student="stage2", teacher="stage2"),
           dict(loss="fitnet", name="fitnet_down", student="stage1", teacher="stage2"),
           dict(loss="fitnet", name="fitnet_up", student="stage3", teacher="stage2"),
           dict(loss="vid", student=["stage1", "stage2", "stage3"]),
           dict(loss="ab", student=["stage1_preact", "stage2_preact", "stage3_preact"]),
           dict(loss="ft", student="stage3"),
           dict(loss="fsp", student=[["stem", "stage1"], ["stage1", "stage2"]], from_teacher="deep"),
           dict(loss="crd", num_negatives=16384)]

  def build():  # traced: the connectors and the memory bank are not initialized
    objective = objectives.build(specs, shapes, nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(objective.connectors())), objective.init_state()

  conns, states = jax.eval_shape(build)
  assert set(conns) == {"fitnet", "fitnet_down", "fitnet_up", "vid", "ab", "ft", "crd"}
  vid = conns["vid"]["items"]
  assert [vid[i]["log_scale"].shape for i in sorted(vid)] == [(64,), (128,), (256,)]  # resnet8x4's widths
  assert states["crd"].memory_t.shape == (50_000, 128)
