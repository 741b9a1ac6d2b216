"""``config.optimizer``: any optax optimizer by name with its keyword arguments, where weight decay
goes, gradient clipping (``l2_grads`` stays the norm before it), the logged learning rate, and
one-line errors naming the field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdlab import models
from kdlab.errors import UserError
from kdlab.train import optim
from kdlab.train.state import Learner, init_state
from kdlab.train.step import make_train_step, objective_for, reduce_metrics

STEPS_PER_EPOCH, TOTAL = 10, 100


def _tree():
  kw, kb = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(kw, (4, 3)), "b": jax.random.normal(kb, (3,))}


def _run(tx: optax.GradientTransformation, steps: int = 3):
  """Parameters after ``steps`` updates with fixed, step-dependent gradients."""
  params = _tree()
  state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _cfg(**fields):
  return {**dict(learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="cosine",
                 warmup_epochs=1.0, boundaries_epochs=[], decay=0.1), **fields}


def _schedule(cfg):
  return optim.learning_rate(cfg, STEPS_PER_EPOCH, TOTAL)


P = pytest.param
OPTIMIZERS = [
    # The optimizers kdlab had before any-name optimizers: built exactly as then (bit-identical runs).
    P(_cfg(name="sgd"), lambda s: optax.sgd(s, momentum=0.9, nesterov=False), id="sgd"),
    P(_cfg(name="sgd", weight_decay=5e-4, nesterov=True),
      lambda s: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(s, momentum=0.9, nesterov=True)),
      id="sgd-decay-nesterov"),
    P(_cfg(name="sgd", momentum=0.0), lambda s: optax.sgd(s, momentum=None), id="sgd-no-momentum"),
    P(_cfg(name="adam", weight_decay=1e-3), lambda s: optax.chain(optax.add_decayed_weights(1e-3), optax.adam(s)),
      id="adam-decay"),
    P(_cfg(name="adamw", weight_decay=0.01), lambda s: optax.adamw(s, weight_decay=0.01), id="adamw"),
    P(_cfg(name="adamw"), lambda s: optax.adamw(s, weight_decay=0.0), id="adamw-no-decay"),  # not optax's 1e-4
    # Any optax optimizer: the decay as its own weight_decay where it takes one, else coupled.
    P(_cfg(name="lion", weight_decay=0.1, kwargs=dict(b1=0.95, b2=0.98)),
      lambda s: optax.lion(s, b1=0.95, b2=0.98, weight_decay=0.1), id="lion"),
    P(_cfg(name="lamb", weight_decay=0.01), lambda s: optax.lamb(s, weight_decay=0.01), id="lamb"),
    P(_cfg(name="adafactor", weight_decay=0.01, kwargs=dict(min_dim_size_to_factor=2)),
      lambda s: optax.adafactor(s, min_dim_size_to_factor=2, weight_decay_rate=0.01), id="adafactor"),
    P(_cfg(name="adabelief", weight_decay=0.01, kwargs=dict(eps=1e-12)),
      lambda s: optax.chain(optax.add_decayed_weights(0.01), optax.adabelief(s, eps=1e-12)), id="adabelief"),
    P(_cfg(name="adamw", weight_decay=0.01, kwargs=dict(b1=0.9, b2=0.95, eps=1e-8)),
      lambda s: optax.adamw(s, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01), id="adamw-kwargs"),
    # Clipping comes first, before coupled decay.
    P(_cfg(name="sgd", weight_decay=5e-4, clip_grad_norm=0.5),
      lambda s: optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(5e-4),
                            optax.sgd(s, momentum=0.9)), id="sgd-clip"),
]


@pytest.mark.parametrize("cfg, reference", OPTIMIZERS)
def test_optimizer_by_name_is_that_optax_optimizer_with_the_schedule(cfg, reference):
  _same(_run(optim.make(cfg, STEPS_PER_EPOCH, TOTAL)), _run(reference(_schedule(cfg))))


def test_config_dict_kwargs_are_passed_through():
  cfg = ml_collections.ConfigDict(_cfg(name="adam", kwargs=dict(b2=0.9, eps=1e-3)))
  _same(_run(optim.make(cfg, STEPS_PER_EPOCH, TOTAL)), _run(optax.adam(_schedule(cfg), b2=0.9, eps=1e-3)))
  plain = _run(optim.make(_cfg(name="adam"), STEPS_PER_EPOCH, TOTAL))
  assert not np.allclose(plain["w"], _run(optim.make(cfg, STEPS_PER_EPOCH, TOTAL))["w"])


BAD = [
    P(dict(name="adamx"), "config.optimizer.name: optax has no optimizer 'adamx'; use an optax optimizer name",
      id="unknown"),
    P(dict(name="clip_by_global_norm"), "config.optimizer.name: optax.clip_by_global_norm is not an optimizer",
      id="not-optimizer"),
    P(dict(name="lbfgs"), "config.optimizer.name: optax.lbfgs fails on a trial update", id="needs-loss"),
    P(dict(name="sm3"), "config.optimizer.name: optax.sm3 refused its arguments", id="no-schedules"),
    P(dict(name="adam", kwargs=dict(beta1=0.9)),
      "config.optimizer.kwargs.beta1: optax.adam takes no argument 'beta1'; it takes b1, b2, eps", id="kwarg-name"),
    P(dict(name="adam", kwargs=dict(b2=1.5)), r"config.optimizer.kwargs.b2=1.5: must be in \[0, 1\)", id="b2"),
    P(dict(name="adam", kwargs=dict(eps="small")), "config.optimizer.kwargs.eps='small': expected a number",
      id="kwarg-type"),
    P(dict(name="adam", kwargs=dict(nesterov="yes")), "config.optimizer.kwargs.nesterov='yes': expected True or",
      id="kwarg-bool"),
    P(dict(name="adamw", kwargs=dict(weight_decay=0.1)),
      "config.optimizer.kwargs.weight_decay: set it as config.optimizer.weight_decay instead", id="kwarg-decay"),
    P(dict(name="adam", kwargs=dict(learning_rate=0.1)), "set it as config.optimizer.learning_rate instead",
      id="kwarg-lr"),
    P(dict(name="sgd", kwargs=dict(momentum=0.5)), "set sgd's momentum as config.optimizer.momentum instead",
      id="kwarg-momentum"),
    P(dict(name="adam", kwargs=[0.9]), "config.optimizer.kwargs must be a dict", id="kwargs-list"),
    P(dict(name="adam", clip_grad_norm=0.0), r"config.optimizer.clip_grad_norm=0.0: use a number > 0", id="clip-0"),
    P(dict(name="adam", clip_grad_norm="1"), r"config.optimizer.clip_grad_norm='1': use a number > 0", id="clip-str"),
    P(dict(name="adam", weight_decay=-1.0), "config.optimizer.weight_decay must be a number >= 0", id="decay"),
    P(dict(name="adam", learning_rate=0.0), "config.optimizer.learning_rate must be > 0", id="lr"),
]


@pytest.mark.parametrize("fields, message", BAD)
def test_bad_optimizer_fields_are_one_line_errors_naming_the_field(fields, message):
  with pytest.raises(UserError, match=message) as info:
    optim.make(_cfg(**fields), STEPS_PER_EPOCH, TOTAL)
  assert "\n" not in str(info.value)


def _train(cfg, steps=3):
  """``steps`` train steps of a tiny MLP (ce) on one fixed batch: the reduced metrics of each."""
  kx, ky = jax.random.split(jax.random.key(1))
  batch = {"image": jax.random.normal(kx, (8, 4)), "label": jax.random.randint(ky, (8,), 0, 3),
           "index": jnp.arange(8, dtype=jnp.int32), "mask": jnp.ones(8, bool)}
  student = models.create("mlp", in_features=4, hidden=(8,), num_classes=3, seed=0)
  objective = objective_for([dict(loss="ce")], student, [], batch, num_examples=8)
  tx = optim.make(cfg, STEPS_PER_EPOCH, TOTAL)
  graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
  step = jax.jit(make_train_step(graphdef, objective, tx, [], lr_schedule=_schedule(cfg)))
  history = []
  for _ in range(steps):
    state, metrics = step(state, [], batch)
    history.append(reduce_metrics(metrics))
  return history


def test_lr_metric_is_the_schedule_at_each_step():
  cfg = _cfg(name="sgd", momentum=0.0, warmup_epochs=0.2)  # 2 warmup steps from 0, then cosine.
  history = _train(cfg, steps=4)
  schedule = _schedule(cfg)
  assert [h["lr"] for h in history] == pytest.approx([float(schedule(i)) for i in range(4)], rel=1e-6)
  assert history[0]["lr"] == 0.0 and history[0]["l2_updates"] == 0.0  # The logged rate is the one applied.
  for h in history[1:]:  # Plain SGD: update = lr x gradient.
    assert h["l2_updates"] == pytest.approx(h["lr"] * h["l2_grads"], rel=1e-5)


def test_clip_grad_norm_scales_the_update_and_logs_the_norm_before_clipping():
  plain = _train(_cfg(name="sgd", momentum=0.0, warmup_epochs=0.0, schedule="constant"), steps=1)[0]
  clip = plain["l2_grads"] / 4
  clipped = _train(_cfg(name="sgd", momentum=0.0, warmup_epochs=0.0, schedule="constant", clip_grad_norm=clip),
                   steps=1)[0]
  assert clipped["l2_grads"] == pytest.approx(plain["l2_grads"], rel=1e-6)  # Logged before clipping.
  assert plain["l2_updates"] == pytest.approx(0.1 * plain["l2_grads"], rel=1e-5)
  assert clipped["l2_updates"] == pytest.approx(0.1 * clip, rel=1e-5)
