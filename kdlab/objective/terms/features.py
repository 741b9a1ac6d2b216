"""Feature, attention and contrastive terms (FitNets, AT, SP, RKD, PKT, NST, CC, VID, AB, FT, FSP,
MiniLM's attention and value relations, InfoNCE, CRD) and the connectors they build.

Every term upcasts its taps to float32 first (:func:`kdlab.objective.terms.common.float32`): a
bfloat16 model's features are pooled, mapped by connectors and compared in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdlab import losses
from kdlab.errors import UserError
from kdlab.models import connectors
from kdlab.objective.registry import register_term
from kdlab.objective.terms import common
from kdlab.objective.types import Shapes, StepInputs


# ---------------------------------------------------------------------------------------------
# Feature, attention and contrastive terms.


class Pair(NamedTuple):
  """A student tap paired with a teacher tap, with their (abstract) shapes."""
  s_tap: str
  t_tap: str
  s_shape: tuple[int, ...]
  t_shape: tuple[int, ...]

  def error(self, what: str) -> UserError:
    return UserError(f"student tap {self.s_tap!r} {self.s_shape} and teacher tap {self.t_tap!r} "
                     f"{self.t_shape}: {what}")


def _tap_names(value: Any, side: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
    return list(value)
  raise UserError(f"{side}={value!r}: expected a tap name or a non-empty list of tap names")


def _pairs(spec: dict[str, Any], shapes: Shapes, default: str | None) -> tuple[int | str, list[Pair]]:
  """Pops ``student`` / ``teacher`` / ``from_teacher``; returns the teacher and the tap pairs."""
  s_value = spec.pop("student", default)
  if s_value is None:
    raise UserError("this loss compares features: give student=TAP and teacher=TAP (feats keys, "
                    "or lists of them paired elementwise)")
  t_value = spec.pop("teacher", s_value)
  teacher = common.teacher_index(spec, shapes)
  s_taps, t_taps = _tap_names(s_value, "student"), _tap_names(t_value, "teacher")
  if len(s_taps) != len(t_taps):
    raise UserError(f"student={s_taps} and teacher={t_taps} must list as many taps (they are paired "
                    f"elementwise)")
  t_out = common.teacher_shapes(shapes, teacher)
  return teacher, [Pair(s, t, tuple(common.tap_shape(shapes.student, s, "student").shape),
                        tuple(common.tap_shape(t_out, t, "teacher").shape)) for s, t in zip(s_taps, t_taps)]


def _positive(spec: dict[str, Any], key: str, default: float) -> float:
  value = spec.pop(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise UserError(f"{key} must be a number > 0, got {value!r}")
  return float(value)


# Shape checks of a pair: each raises a UserError naming both taps.

def _check_any(pair: Pair) -> None:
  if len(pair.s_shape) < 2 or len(pair.t_shape) < 2:
    raise pair.error("expected features with a batch axis and at least one feature axis")


def _check_spatial(pair: Pair) -> None:
  if len(pair.s_shape) < 3 or len(pair.s_shape) != len(pair.t_shape) or pair.s_shape[:-1] != pair.t_shape[:-1]:
    raise pair.error("differ in spatial size (this loss compares maps position by position; channels may "
                     "differ): tap layers of equal resolution")


def _check_same_shape(pair: Pair) -> None:
  if pair.s_shape != pair.t_shape or len(pair.s_shape) < 3:
    raise pair.error("differ in shape; this loss needs [B, heads, q, k] attention maps of the same shape")


def _check_values(pair: Pair) -> None:
  if len(pair.s_shape) < 3 or pair.s_shape[:-1] != pair.t_shape[:-1]:
    raise pair.error("must agree in all but the last axis ([B, heads, L, d]; head sizes may differ)")


def _check_poolable(pair: Pair) -> None:
  s, t = pair.s_shape, pair.t_shape
  if len(s) != 4 or len(t) != 4 or not all(max(a, b) % min(a, b) == 0 for a, b in zip(s[1:3], t[1:3])):
    raise pair.error("with pool=True, expected NHWC maps whose spatial sizes are equal or differ by integer "
                     "factors (the larger is average-pooled to the smaller)")


def _pool_pair(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Average-pools the larger of two NHWC maps to the other's spatial size (RepDistiller's AT/NST/FT/VID)."""
  size = (min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2]))
  return connectors.avg_pool_to(s, size), connectors.avg_pool_to(t, size)


def _pool_apply(module: Any, s: jax.Array, t: jax.Array):
  return (*_pool_pair(s, t), {})


def _pool_option(spec: dict[str, Any]) -> bool:
  pool = spec.pop("pool", False)
  if not isinstance(pool, bool):
    raise UserError(f"pool must be True or False, got {pool!r}")
  return pool


def with_pool_option(strict: Callable[..., Any], pooled: Callable[..., Any]):
  """A builder that uses ``pooled`` for specs with ``pool=True`` (maps of different resolution are
  compared after average-pooling the larger to the smaller, as RepDistiller's AT and NST do), else ``strict``."""

  def builder(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
    return (pooled if _pool_option(spec) else strict)(spec, shapes=shapes, rngs=rngs)

  return builder


def _check_vid(pair: Pair) -> None:
  s, t = pair.s_shape, pair.t_shape
  if len(s) != len(t) or len(s) not in (2, 4):
    raise pair.error("expected two [B, D] vectors or two NHWC maps")
  if len(s) == 4 and not (connectors.poolable(s, t) or connectors.poolable(t, s)):
    raise pair.error("spatial sizes must be equal or differ by integer factors (the larger map is pooled)")


def feature_term(loss_fn: Callable[..., jax.Array], *, default_tap: str | None = None,
                 check: Callable[[Pair], None] = _check_any,
                 connector: Callable[[Pair, dict[str, Any], Any], Any] | None = None,
                 apply: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, dict]] | None = None,
                 exclude: tuple[str, ...] = ("where",), query_mask: bool = False):
  """Builder for ``loss_fn(s, t, **hparams)`` summed over tap pairs.

  ``connector(pair, spec, rngs)`` builds one pair's connector (popping its options from
  ``spec``; ``None`` for no connector); ``apply(connector, s, t) -> (s, t, extra_kwargs)`` maps
  the taps through it inside the step. With ``query_mask``, text batches pass
  ``where=token_mask > 0`` (``[B, L]``: the loss averages over positions with a real target), and
  under ``config.train.token_normalization="global"`` that mean becomes the ``token_weights`` sum
  (:func:`common.rescale_query_mean`).
  """

  def builder(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
    teacher, pairs = _pairs(spec, shapes, default_tap)
    for pair in pairs:
      check(pair)
    made = None
    if connector is not None:
      built, options = [], spec
      for pair in pairs:
        options = dict(spec)  # Each pair's connector reads the same options; they are then consumed.
        try:
          built.append(connector(pair, options, rngs))
        except ValueError as e:
          raise pair.error(str(e)) from None
      spec = options
      if any(c is not None for c in built):
        made = connectors.Stack(built)
    hparams = common.hparams(loss_fn, spec, exclude)

    def fn(module: Any, inputs: StepInputs, state: Any):
      t_out = common.teacher_output(inputs, teacher)
      where = {"where": inputs.batch["token_mask"] > 0} if query_mask and "token_mask" in inputs.batch else {}
      total = None
      for i, pair in enumerate(pairs):
        s, t, extra = common.float32(inputs.student.tap(pair.s_tap)), common.float32(t_out.tap(pair.t_tap)), {}
        if apply is not None:
          s, t, extra = apply(None if module is None else module[i], s, t)
        loss = loss_fn(s, t, **hparams, **extra, **where)
        total = loss if total is None else total + loss
      if where:
        total = common.rescale_query_mean(total, inputs.batch)
      return total, None

    return fn, made, None

  return builder


def _regress(module: Any, s: jax.Array, t: jax.Array):
  return module(s, train=True), t, {}


def _embed(module: Any, s: jax.Array, t: jax.Array):
  if module is None:  # feat_dim=None: compare the flattened taps themselves.
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), {}
  return module.student(s, train=True), module.teacher(t, train=True), {}


def _embed_pair(pair: Pair, spec: dict[str, Any], rngs: Any):
  dim = common.positive_int(spec, "feat_dim", 128)
  if dim is None:
    if math.prod(pair.s_shape[1:]) != math.prod(pair.t_shape[1:]):
      raise ValueError("without embedding heads (feat_dim=None) the flattened taps must have the same size")
    return None
  return connectors.EmbedPair(pair.s_shape, pair.t_shape, dim, rngs=rngs)


def _fitnet_regressor(pair: Pair, spec: dict[str, Any], rngs: Any):
  return connectors.FitNetRegressor(pair.s_shape, pair.t_shape, rngs=rngs)


def _ab_connector(pair: Pair, spec: dict[str, Any], rngs: Any):
  if len(pair.s_shape) == 4 and len(pair.t_shape) == 4 and pair.s_shape[1:3] != pair.t_shape[1:3]:
    # RepDistiller's Connector: ConvReg without its ReLU maps the student map to the teacher's size.
    return connectors.FitNetRegressor(pair.s_shape, pair.t_shape, relu=False, rngs=rngs)
  return connectors.ABConnector(pair.s_shape[-1], pair.t_shape[-1], rngs=rngs)


def _check_ab(pair: Pair) -> None:
  # NHWC maps of different sizes get a resizing connector (which refuses ratios it cannot map).
  if len(pair.s_shape) != 4 or len(pair.t_shape) != 4:
    _check_spatial(pair)


def _vid_regressor(pair: Pair, spec: dict[str, Any], rngs: Any):
  init_var = _positive(spec, "init_var", 5.0)
  eps = spec.get("eps", 1e-5)
  if isinstance(eps, (int, float)) and init_var <= eps:
    raise ValueError(f"init_var={init_var} must exceed eps={eps}")
  return connectors.VIDRegressor(pair.s_shape[-1], pair.t_shape[-1], init_var=init_var, eps=eps, rngs=rngs)


def _vid_apply(module: Any, s: jax.Array, t: jax.Array):
  # RepDistiller pools whichever map is larger to the other's size.
  if s.ndim == 4:
    size = (min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2]))
    s, t = connectors.avg_pool_to(s, size), connectors.avg_pool_to(t, size)
  return module(s, train=True), t, {"log_scale": module.log_scale[...]}


register_term("fitnet")(feature_term(losses.fitnet, connector=_fitnet_regressor, apply=_regress))
register_term("sp")(feature_term(losses.sp))
register_term("rkd_distance")(feature_term(losses.rkd_distance, default_tap="pool"))
register_term("rkd_angle")(feature_term(losses.rkd_angle, default_tap="pool"))
register_term("pkt")(feature_term(losses.pkt, default_tap="pool"))
register_term("nst")(with_pool_option(feature_term(losses.nst, check=_check_spatial),
                                      feature_term(losses.nst, check=_check_poolable, apply=_pool_apply)))
register_term("cc")(feature_term(losses.cc, default_tap="pool", connector=_embed_pair, apply=_embed))
register_term("vid")(feature_term(losses.vid, check=_check_vid, connector=_vid_regressor, apply=_vid_apply,
                                  exclude=("where", "log_scale")))
register_term("ab")(feature_term(losses.ab, check=_check_ab, connector=_ab_connector, apply=_regress))
register_term("at")(with_pool_option(feature_term(losses.at, check=_check_spatial),
                                     feature_term(losses.at, check=_check_poolable, apply=_pool_apply)))
register_term("attention_kl")(feature_term(losses.attention_kl, check=_check_same_shape, query_mask=True))
register_term("value_relation")(feature_term(losses.value_relation, check=_check_values, query_mask=True))
register_term("info_nce")(feature_term(losses.info_nce, default_tap="pool", connector=_embed_pair, apply=_embed))


@register_term("ft")
def _ft(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """Factor transfer: ``ft(translator(s), paraphraser.encode(t)) + w * reconstruction``.

  The paraphraser learns only from its autoencoder loss ``mean((decode(encode(t)) - t)^2)``
  (RepDistiller pre-trains it that way and then freezes it); the factor it gives the FT loss is
  under ``stop_gradient``, so it cannot collapse to match the translator. The term's value is the
  FT loss plus ``reconstruction_weight`` (default 1; 0 freezes the paraphraser at its init) times
  the reconstruction error. Pre-train it with ``config.connector_warmup_steps``. With
  ``pool=True`` the taps may differ in resolution by integer factors: the larger factor is
  average-pooled to the smaller before the FT loss (RepDistiller's ``FactorTransfer``).
  """
  pool = _pool_option(spec)
  teacher, pairs = _pairs(spec, shapes, None)
  for pair in pairs:
    if pool:
      _check_poolable(pair)
    else:
      _check_spatial(pair)
    if len(pair.s_shape) != 4:
      raise pair.error("factor transfer needs NHWC maps")
  rate = _positive(spec, "rate", 0.5)
  recon_weight = spec.pop("reconstruction_weight", 1.0)
  if isinstance(recon_weight, bool) or not isinstance(recon_weight, (int, float)) or recon_weight < 0:
    raise UserError(f"reconstruction_weight must be a number >= 0, got {recon_weight!r}")
  module = connectors.Stack([connectors.FactorTransfer(p.s_shape, p.t_shape, rate=rate, rngs=rngs) for p in pairs])
  hparams = common.hparams(losses.ft, spec)

  def fn(module: Any, inputs: StepInputs, state: Any):
    t_out = common.teacher_output(inputs, teacher)
    total = None
    for i, pair in enumerate(pairs):
      conn = module[i]
      t = common.float32(t_out.tap(pair.t_tap))
      factor_t = conn.paraphraser.encode(t, train=True)
      recon = conn.paraphraser.decoder(factor_t, train=True)
      factor_s = conn.translator(common.float32(inputs.student.tap(pair.s_tap)), train=True)
      factor_s, factor_t_cmp = _pool_pair(factor_s, factor_t) if pool else (factor_s, factor_t)
      loss = losses.ft(factor_s, jax.lax.stop_gradient(factor_t_cmp), **hparams)
      if recon_weight:
        loss = loss + recon_weight * jnp.mean(jnp.square(recon - t).reshape(t.shape[0], -1), axis=-1)
      total = loss if total is None else total + loss
    return total, None

  return fn, module, None


def _tap_pair(value: Any, side: str) -> list[tuple[str, str]]:
  """fsp's ``student=("stage1", "stage2")`` or ``[["stage1", "stage2"], ["stage2", "stage3"]]``."""
  def is_pair(v):
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v)
  if is_pair(value):
    return [tuple(value)]
  if isinstance(value, (list, tuple)) and value and all(is_pair(v) for v in value):
    return [tuple(v) for v in value]
  raise UserError(f"{side}={value!r}: fsp compares pairs of taps of one network; give "
                  f"{side}=('stage1', 'stage2') or a list of such pairs")


@register_term("fsp")
def _fsp(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  s_value = spec.pop("student", None)
  if s_value is None:
    raise UserError("fsp needs student=(TAP1, TAP2) (and teacher=..., default the same names)")
  s_pairs = _tap_pair(s_value, "student")
  t_pairs = _tap_pair(spec.pop("teacher", s_value), "teacher")
  teacher = common.teacher_index(spec, shapes)
  if len(s_pairs) != len(t_pairs):
    raise UserError(f"student={s_pairs} and teacher={t_pairs} must list as many pairs")
  t_out = common.teacher_shapes(shapes, teacher)

  def pair_shapes(output, taps, side):
    found = [tuple(common.tap_shape(output, tap, side).shape) for tap in taps]
    for tap, shape in zip(taps, found):
      if len(shape) != 4:
        raise UserError(f"{side} tap {tap!r} {shape}: fsp needs NHWC maps")
    small = (min(found[0][1], found[1][1]), min(found[0][2], found[1][2]))
    if not all(connectors.poolable(f, (0, *small)) for f in found):
      raise UserError(f"{side} taps {taps} {found}: their spatial sizes must differ by integer factors")
    return found

  for s_taps, t_taps in zip(s_pairs, t_pairs):
    s1, s2 = pair_shapes(shapes.student, s_taps, "student")
    t1, t2 = pair_shapes(t_out, t_taps, "teacher")
    if (s1[-1], s2[-1]) != (t1[-1], t2[-1]):
      raise UserError(f"student taps {list(s_taps)} {[s1, s2]} and teacher taps {list(t_taps)} {[t1, t2]}: "
                      f"FSP matrices [C1, C2] differ ({(s1[-1], s2[-1])} vs {(t1[-1], t2[-1])}); fsp needs "
                      f"taps with equal channel counts")
  hparams = common.hparams(losses.fsp, spec)

  def fn(module: Any, inputs: StepInputs, state: Any):
    t_out = common.teacher_output(inputs, teacher)
    total = None
    for s_taps, t_taps in zip(s_pairs, t_pairs):
      loss = losses.fsp(tuple(common.float32(inputs.student.tap(tap)) for tap in s_taps),
                        tuple(common.float32(t_out.tap(tap)) for tap in t_taps), **hparams)
      total = loss if total is None else total + loss
    return total, None

  return fn, None, None


@register_term("crd")
def _crd(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """CRD with embedding heads on both sides (dim ``feat_dim``, default 128) and its memory bank.

  ``num_negatives`` defaults to ``min(4096, N - 1)`` for ``N`` training examples; the bank
  (:func:`kdlab.losses.crd_init_state`) is the term's state, indexed by ``batch["index"]``.
  """
  teacher, pairs = _pairs(spec, shapes, "pool")
  if len(pairs) != 1:
    raise UserError("crd compares one student tap with one teacher tap; add one crd term per pair")
  (pair,) = pairs
  _check_any(pair)
  feat_dim = common.positive_int(spec, "feat_dim", 128)
  n = shapes.num_examples
  num_negatives = spec.pop("num_negatives", None)
  if num_negatives is None:
    num_negatives = max(1, min(4096, n - 1))
  elif isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
    raise UserError(f"num_negatives must be an int, got {num_negatives!r}")
  elif num_negatives <= 0:
    raise UserError(f"num_negatives must be > 0, got {num_negatives}")
  elif num_negatives >= n:
    raise UserError(f"num_negatives={num_negatives} must be < the {n} training examples (negatives are drawn "
                    f"from the memory bank of one row per example)")
  hparams = common.hparams(losses.crd, spec, exclude=("where", "key", "num_negatives", "negative_indices"))
  module = connectors.EmbedPair(pair.s_shape, pair.t_shape, feat_dim, rngs=rngs)
  state = losses.crd_init_state(n, feat_dim, rngs.params())

  def fn(module: Any, inputs: StepInputs, state: Any):
    s = module.student(common.float32(inputs.student.tap(pair.s_tap)), train=True)
    t = module.teacher(common.float32(common.teacher_output(inputs, teacher).tap(pair.t_tap)), train=True)
    return losses.crd(s, t, inputs.batch["index"], state, key=inputs.key, num_negatives=num_negatives,
                      **hparams)

  return fn, module, state


