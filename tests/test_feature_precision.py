"""Feature losses and feature terms compute in float32 (docs/design.md): a bfloat16 feature pair gives
the loss of its float32 upcast, as float32 — also where a term pools the taps or maps them through a
connector before the loss (a bfloat16 model's ``feats``, e.g. ``create("gpt", dtype="bfloat16")``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdlab import losses, objective as objectives
from kdlab.objective import ModelOutput, Shapes, StepInputs

B, N = 4, 16


# Inputs are drawn by numpy: jax.random would compile a program per shape, eagerly.
def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), jnp.bfloat16)


def _probs(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Rows of a softmax ``[..., n]`` in bfloat16 (each sums to 1 up to bfloat16 rounding)."""
  x = 3.0 * np.asarray(_normal(seed, shape), np.float32)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return jnp.asarray(e / e.sum(axis=-1, keepdims=True), jnp.bfloat16)


def _crd(s, t):
  state = losses.crd_init_state(N, s.shape[-1], jax.random.key(3))
  return losses.crd(s, t, jnp.arange(B), state, key=jax.random.key(4), num_negatives=5)[0]


# name -> (loss of (s, t), student input, teacher input); fsp takes pairs of maps.
LOSSES = {
    "fitnet": (losses.fitnet, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 4, 4, 6))),
    "sp": (losses.sp, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 2, 2, 8))),
    "rkd_distance": (losses.rkd_distance, _normal(0, (B, 6)), _normal(1, (B, 8))),
    "rkd_angle": (losses.rkd_angle, _normal(0, (B, 6)), _normal(1, (B, 8))),
    "pkt": (losses.pkt, _normal(0, (B, 6)), _normal(1, (B, 8))),
    "nst": (losses.nst, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 4, 4, 8))),
    "cc": (losses.cc, _normal(0, (B, 6)), _normal(1, (B, 8))),
    "vid": (lambda s, t: losses.vid(s, t, log_scale=_normal(2, (6,))), _normal(0, (B, 4, 4, 6)),
            _normal(1, (B, 4, 4, 6))),
    "ab": (losses.ab, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 4, 4, 6))),
    "ft": (losses.ft, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 4, 4, 6))),
    "fsp": (losses.fsp, (_normal(0, (B, 4, 4, 3)), _normal(1, (B, 2, 2, 5))),
            (_normal(2, (B, 4, 4, 3)), _normal(3, (B, 2, 2, 5)))),
    "at": (losses.at, _normal(0, (B, 4, 4, 6)), _normal(1, (B, 4, 4, 8))),
    "attention_kl": (losses.attention_kl, _probs(0, (B, 2, 5, 5)), _probs(1, (B, 2, 5, 5))),
    "value_relation": (losses.value_relation, _normal(0, (B, 2, 5, 4)), _normal(1, (B, 2, 5, 6))),
    "info_nce": (losses.info_nce, _normal(0, (B, 8)), _normal(1, (B, 8))),
    "crd": (_crd, _normal(0, (B, 8)), _normal(1, (B, 8))),
}


def _upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_feature_loss_of_bfloat16_equals_its_float32_upcast(name):
  fn, s, t = LOSSES[name]
  assert {x.dtype for x in jax.tree.leaves((s, t))} == {jnp.dtype(jnp.bfloat16)}
  got, want = fn(s, t), fn(_upcast(s), _upcast(t))
  assert got.dtype == jnp.float32 and got.shape == (B,)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# Student and teacher taps of different widths and resolutions: connectors and pooling have work.
S_FEATS = {"stage1": (B, 8, 8, 4), "stage2": (B, 4, 4, 8), "stage2_preact": (B, 4, 4, 8), "pool": (B, 8),
           "attn": (B, 2, 6, 6), "values": (B, 2, 6, 4)}
T_FEATS = {"stage1": (B, 8, 8, 6), "stage2": (B, 4, 4, 12), "stage2_preact": (B, 4, 4, 12), "pool": (B, 12),
           "attn": (B, 2, 6, 6), "values": (B, 2, 6, 8)}
TERMS = [
    dict(loss="at", pool=True, student="stage1", teacher="stage2"),
    dict(loss="nst", pool=True, student="stage1", teacher="stage2"),
    dict(loss="ft", pool=True, student="stage1", teacher="stage2"),
    dict(loss="vid", student="stage1", teacher="stage2"),
    dict(loss="fitnet", student="stage1", teacher="stage2"),
    dict(loss="ab", student="stage2_preact"),
    dict(loss="sp", student="stage1", teacher="stage2"),
    dict(loss="rkd_angle"),
    dict(loss="cc", feat_dim=8),
    dict(loss="crd", feat_dim=8, num_negatives=5),
    dict(loss="attention_kl", student="attn", teacher="attn"),
    dict(loss="value_relation", student="values", teacher="values"),
]


def _output(feats: dict[str, tuple[int, ...]], seed: int) -> ModelOutput:
  made = {}
  for i, (name, shape) in enumerate(sorted(feats.items())):
    made[name] = _probs(seed + i, shape) if name == "attn" else _normal(seed + i, shape)
  return ModelOutput(_normal(seed + 9, (B, 10)).astype(jnp.float32), made)


def test_feature_terms_upcast_before_pooling_and_connectors():
  student, teacher = _output(S_FEATS, 0), _output(T_FEATS, 20)
  shapes = Shapes(jax.eval_shape(lambda: student), [jax.eval_shape(lambda: teacher)], ["t"], N)
  objective = objectives.build(TERMS, shapes, nnx.Rngs(0))
  batch = {"label": jnp.zeros(B, jnp.int32), "index": jnp.arange(B), "mask": jnp.ones(B, bool)}

  graphdef, variables = nnx.split(objective.connectors())

  @jax.jit  # One program per input dtype: eagerly, each of the terms' ops would be compiled on its own.
  def losses_of(s: ModelOutput, t: ModelOutput, variables) -> dict[str, jax.Array]:
    inputs = StepInputs(s, [t], batch, jnp.zeros((), jnp.int32), jax.random.key(5))
    return objective.term_losses(nnx.merge(graphdef, variables), inputs, objective.init_state())[0]

  got, want = losses_of(student, teacher, variables), losses_of(_upcast(student), _upcast(teacher), variables)
  assert set(got) == {t.get("name", t["loss"]) for t in TERMS}
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
