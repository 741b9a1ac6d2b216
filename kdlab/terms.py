"""Builders that turn ``config.objective`` entries into terms (see :mod:`kdlab.objectives`).

Common options of a term spec:
  * ``student`` / ``teacher``: the tap each side reads (``"logits"`` or a ``feats`` key). Feature
    terms also take a list of taps per side, paired elementwise, with the loss summed over the
    pairs (``student=["stage1", "stage2"]``); ``teacher`` defaults to the same names as
    ``student``. ``fsp`` takes pairs of taps (``student=[["stage1", "stage2"], ...]``).
  * ``from_teacher``: which teacher (index into ``config.teachers`` or its name; default 0).
  * connector options where a term has one: ``feat_dim`` (embedding heads of crd, info_nce, cc),
    ``init_var`` (vid), ``rate`` and ``reconstruction_weight`` (ft).
  * ``pool=True`` (at, nst, ft): maps whose resolutions differ by integer factors are compared
    after average-pooling the larger to the smaller (RepDistiller; vid always does this).
Any other key is the loss function's keyword hyperparameter.

Token logits (language models, ``[B, L, V]``, text batches): ``ce`` compares with
``batch["targets"]`` and the logit terms with the teacher's logits position by position; each
per-token loss is averaged over the sequence's real tokens (``batch["token_mask"]``), giving one
loss per sequence (:mod:`kdlab.losses.sequence`). ``kd``, ``reverse_kl``, ``jsd`` and ``tvd`` take
``impl="plain" | "chunked" | "fused"`` (and ``chunk_size``, tokens per chunk): ``chunked`` never
holds more than one chunk of ``[tokens, V]`` probabilities; ``fused`` computes the logits chunk by
chunk from ``feats["final"]`` and each model's unembedding (``ModelOutput.unembedding``) inside
the loss (same value; the models' own logits are still computed for the other terms and metrics).
The logit terms also take ``length_normalize=False``: the sum over the sequence's tokens instead
of their mean (the per-sequence loss scales with the generated length; MiniLLM's option).
``attention_kl`` / ``value_relation`` (MiniLM) average over the query positions with a real target.

Connectors (:mod:`kdlab.models.connectors`) are built here from the tap shapes and called with
``train=True`` inside the train step; a term whose taps they cannot connect fails at start-up
with a message naming the taps.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdlab import losses
from kdlab.errors import UserError
from kdlab.losses import sequence
from kdlab.losses.ensembles import METHODS as COMBINE_METHODS
from kdlab.models import connectors
from kdlab.objectives import Shapes, StepInputs, register_term


def _teacher_index(spec: dict[str, Any], shapes: Shapes) -> int | str:
  """Resolves ``from_teacher``: an index or name in ``config.teachers``, or ``"self"``.

  ``"self"`` makes the student its own (stop-gradient) teacher, e.g. a deep
  exit teaching a shallow one; ``"ema"`` is the EMA teacher when
  ``config.ema_teacher`` is set.
  """
  ref = spec.pop("from_teacher", 0)
  if ref == "self":
    return "self"
  if not shapes.teachers:
    raise UserError("this term needs a teacher but config.teachers is empty (or use from_teacher='self')")
  if isinstance(ref, str):
    if ref not in shapes.teacher_names:
      raise UserError(f"from_teacher={ref!r} names no teacher; teachers are {list(shapes.teacher_names)}")
    return list(shapes.teacher_names).index(ref)
  if not isinstance(ref, int) or not 0 <= ref < len(shapes.teachers):
    raise UserError(f"from_teacher={ref!r} is out of range; there are {len(shapes.teachers)} teachers")
  return ref


def _teacher_output(inputs: StepInputs, teacher: int | str) -> Any:
  return jax.lax.stop_gradient(inputs.student) if teacher == "self" else inputs.teachers[teacher]


def _teacher_shapes(shapes: Shapes, teacher: int | str) -> Any:
  return shapes.student if teacher == "self" else shapes.teachers[teacher]


def _tap_shape(output: Any, tap: str, side: str) -> Any:
  if tap != "logits" and tap not in output.feats:
    raise UserError(f"{side}={tap!r} is not a tap of the {side} model; taps are "
                    f"{['logits', *sorted(output.feats)]}")
  return output.tap(tap)


def _hparams(fn: Callable[..., Any], spec: dict[str, Any], exclude: tuple[str, ...] = ("where",)) -> dict[str, Any]:
  """Pops ``fn``'s keyword-only hyperparameters out of ``spec``; leftovers are an error."""
  params = inspect.signature(fn).parameters
  allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in exclude}
  unknown = sorted(set(spec) - allowed)
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for loss {fn.__name__}; allowed: {sorted(allowed)}")
  return {n: spec.pop(n) for n in list(spec)}


IMPLS = ("plain", "chunked", "fused")


def _is_token(shape: Any) -> bool:
  """Whether a tap holds token logits ``[B, L, V]`` (a language model's)."""
  return len(shape.shape) == 3


def _token_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """``[B, L]`` real-target mask of a text batch."""
  if "token_mask" not in batch:
    raise UserError("token logits [batch, length, vocab] need text batches (a text data source such as "
                    "pysrc, whose batches carry targets and token_mask)")
  return batch["token_mask"]


def _labels(batch: Mapping[str, jax.Array], token: bool) -> jax.Array:
  return batch["targets"] if token else batch["label"]


@register_term("ce", group="task")
def _ce(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """Cross-entropy with the labels; for token logits with ``batch["targets"]``, per sequence."""
  tap = spec.pop("student", "logits")
  token = _is_token(_tap_shape(shapes.student, tap, "student"))
  hparams = _hparams(losses.ce, spec)

  def fn(connector: Any, inputs: StepInputs, state: Any):
    loss = losses.ce(inputs.student.tap(tap), _labels(inputs.batch, token), **hparams)
    if token:
      loss = sequence.masked_sequence_mean(loss, _token_mask(inputs.batch))
    return loss, None

  return fn, None, None


def _token_impl(spec: dict[str, Any], loss_fn: Callable[..., jax.Array], token: bool, group: Any,
                s_tap: str, t_tap: str) -> tuple[str, int | None]:
  """Pops and checks ``impl`` and ``chunk_size`` (token-level divergences)."""
  impl = spec.pop("impl", "plain")
  chunk_size = _positive_int(spec, "chunk_size", None)
  if impl not in IMPLS:
    raise UserError(f"impl={impl!r}: unknown; choose one of {', '.join(IMPLS)}")
  if impl == "plain":
    if chunk_size is not None:
      raise UserError("chunk_size applies to impl='chunked' or impl='fused'")
    return impl, None
  if not token:
    raise UserError(f"impl={impl!r} applies to token logits [batch, length, vocab] (language models); "
                    f"use impl='plain' here")
  if loss_fn.__name__ not in sequence.DIVERGENCES:
    raise UserError(f"impl={impl!r}: only {', '.join(sequence.DIVERGENCES)} have chunked and fused forms")
  if group is not None:
    raise UserError(f"impl={impl!r} distils from one teacher (from_teacher); use impl='plain' with from_teachers")
  if impl == "fused" and (s_tap, t_tap) != ("logits", "logits"):
    raise UserError("impl='fused' computes the logits from feats['final']; it takes student='logits' and "
                    "teacher='logits'")
  return impl, chunk_size


def _check_fused(output: Any, side: str) -> None:
  if output.unembedding is None or "final" not in output.feats:
    raise UserError(f"impl='fused' needs the {side} model's unembedding and feats['final'] (e.g. a gpt model); "
                    f"use impl='chunked'")


def logit_pair_term(loss_fn: Callable[..., jax.Array], *, needs_labels: bool = False):
  """Builder for ``loss_fn(s, t, [labels], **hparams)`` between two same-shaped taps.

  Besides ``from_teacher``, a spec may name several teachers,
  ``from_teachers=["t0", "t1"]`` with ``combine="mean_probs" | "mean_logits" |
  "weighted" | "confidence"`` (and ``combine_weights=[...]`` for "weighted"):
  the target is :func:`kdlab.losses.combine_teachers` of their taps at the
  term's temperature.
  """

  def builder(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
    s_tap, t_tap = spec.pop("student", "logits"), spec.pop("teacher", "logits")
    s_shape = _tap_shape(shapes.student, s_tap, "student")
    token = _is_token(s_shape)
    group = spec.pop("from_teachers", None)
    impl, chunk_size = _token_impl(spec, loss_fn, token, group, s_tap, t_tap)
    length_normalize = spec.pop("length_normalize", True)  # on-policy / MiniLLM option (kdlab.train.on_policy)
    if not isinstance(length_normalize, bool) or (not length_normalize and not token):
      raise UserError(f"length_normalize={length_normalize!r}: True (mean over a sequence's tokens) or False (their "
                      f"sum), for token logits [batch, length, vocab] only")
    method, weights = spec.pop("combine", None), spec.pop("combine_weights", None)
    if group is None:
      if method is not None or weights is not None:
        raise UserError("combine=... needs from_teachers=[...] (a list of teachers)")
      teachers = [_teacher_index(spec, shapes)]
    else:
      if "from_teacher" in spec or not isinstance(group, (list, tuple)) or not group:
        raise UserError("give either from_teacher=NAME or a non-empty list from_teachers=[...], not both")
      if method not in COMBINE_METHODS:
        raise UserError(f"combine={method!r}: choose one of {list(COMBINE_METHODS)}")
      teachers = [_teacher_index({"from_teacher": ref}, shapes) for ref in group]
    for teacher in teachers:
      t_shape = _tap_shape(_teacher_shapes(shapes, teacher), t_tap, "teacher")
      if s_shape.shape != t_shape.shape:
        raise UserError(f"student tap {s_tap!r} {s_shape.shape} and teacher tap {t_tap!r} {t_shape.shape} "
                        f"differ in shape (e.g. the number of classes)")
    if impl == "fused":
      _check_fused(shapes.student, "student")
      _check_fused(_teacher_shapes(shapes, teachers[0]), "teacher")
    hparams = _hparams(loss_fn, spec)
    temperature = hparams.get("temperature", 1.0)

    def target(inputs: StepInputs) -> jax.Array:
      taps = [_teacher_output(inputs, t).tap(t_tap) for t in teachers]
      if group is None:
        return taps[0]
      labels = _labels(inputs.batch, token) if method == "confidence" else None
      return losses.combine_teachers(jnp.stack(taps), method=method, temperature=temperature,
                                     weights=None if weights is None else jnp.asarray(weights), labels=labels)

    def fn(connector: Any, inputs: StepInputs, state: Any):
      if impl == "fused":
        s_out, t_out = inputs.student, _teacher_output(inputs, teachers[0])
        return sequence.fused_token_kd(s_out.feats["final"], s_out.unembedding, t_out.feats["final"],
                                       t_out.unembedding, _token_mask(inputs.batch), divergence=loss_fn.__name__,
                                       chunk_size=chunk_size, **hparams), None
      s, t = inputs.student.tap(s_tap), target(inputs)
      if impl == "chunked":
        return sequence.chunked_token_kd(s, t, _token_mask(inputs.batch), divergence=loss_fn.__name__,
                                         chunk_size=chunk_size, **hparams), None
      if needs_labels:
        loss = loss_fn(s, t, _labels(inputs.batch, token), **hparams)
      else:
        loss = loss_fn(s, t, **hparams)
      if token:  # Per token -> per sequence: the mean over its real tokens.
        loss = sequence.masked_sequence_mean(loss, _token_mask(inputs.batch))
      return loss, None

    if not length_normalize:  # The sum over the sequence's tokens (mean x count) instead of their mean.
      mean_fn = fn

      def fn(connector: Any, inputs: StepInputs, state: Any):
        loss, new_state = mean_fn(connector, inputs, state)
        return loss * jnp.sum(_token_mask(inputs.batch).astype(jnp.float32), axis=-1), new_state

    return fn, None, None

  return builder


register_term("kd")(logit_pair_term(losses.kd))
register_term("reverse_kl")(logit_pair_term(losses.reverse_kl))
register_term("jsd")(logit_pair_term(losses.jsd))
register_term("tvd")(logit_pair_term(losses.tvd))
register_term("dkd")(logit_pair_term(losses.dkd, needs_labels=True))
register_term("logit_l2")(logit_pair_term(losses.logit_l2))
register_term("hard_ce")(logit_pair_term(losses.hard_ce))
# A metric (no gradient): logged as agreement/<name>; give it weight=0.0.
register_term("top_k_agreement", group="agreement")(logit_pair_term(losses.top_k_agreement))


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
  teacher = _teacher_index(spec, shapes)
  s_taps, t_taps = _tap_names(s_value, "student"), _tap_names(t_value, "teacher")
  if len(s_taps) != len(t_taps):
    raise UserError(f"student={s_taps} and teacher={t_taps} must list as many taps (they are paired "
                    f"elementwise)")
  t_out = _teacher_shapes(shapes, teacher)
  return teacher, [Pair(s, t, tuple(_tap_shape(shapes.student, s, "student").shape),
                        tuple(_tap_shape(t_out, t, "teacher").shape)) for s, t in zip(s_taps, t_taps)]


def _positive_int(spec: dict[str, Any], key: str, default: int | None) -> int | None:
  value = spec.pop(key, default)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise UserError(f"{key} must be an int, got {value!r}")
  if value <= 0:
    raise UserError(f"{key} must be > 0, got {value}")
  return value


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
  ``where=token_mask > 0`` (``[B, L]``: the loss averages over positions with a real target).
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
    hparams = _hparams(loss_fn, spec, exclude)

    def fn(module: Any, inputs: StepInputs, state: Any):
      t_out = _teacher_output(inputs, teacher)
      where = {"where": inputs.batch["token_mask"] > 0} if query_mask and "token_mask" in inputs.batch else {}
      total = None
      for i, pair in enumerate(pairs):
        s, t, extra = inputs.student.tap(pair.s_tap), t_out.tap(pair.t_tap), {}
        if apply is not None:
          s, t, extra = apply(None if module is None else module[i], s, t)
        loss = loss_fn(s, t, **hparams, **extra, **where)
        total = loss if total is None else total + loss
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
  dim = _positive_int(spec, "feat_dim", 128)
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
  hparams = _hparams(losses.ft, spec)

  def fn(module: Any, inputs: StepInputs, state: Any):
    t_out = _teacher_output(inputs, teacher)
    total = None
    for i, pair in enumerate(pairs):
      conn = module[i]
      t = t_out.tap(pair.t_tap).astype(jnp.float32)
      factor_t = conn.paraphraser.encode(t, train=True)
      recon = conn.paraphraser.decoder(factor_t, train=True)
      factor_s = conn.translator(inputs.student.tap(pair.s_tap), train=True)
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
  teacher = _teacher_index(spec, shapes)
  if len(s_pairs) != len(t_pairs):
    raise UserError(f"student={s_pairs} and teacher={t_pairs} must list as many pairs")
  t_out = _teacher_shapes(shapes, teacher)

  def pair_shapes(output, taps, side):
    found = [tuple(_tap_shape(output, tap, side).shape) for tap in taps]
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
  hparams = _hparams(losses.fsp, spec)

  def fn(module: Any, inputs: StepInputs, state: Any):
    t_out = _teacher_output(inputs, teacher)
    total = None
    for s_taps, t_taps in zip(s_pairs, t_pairs):
      loss = losses.fsp(tuple(inputs.student.tap(tap) for tap in s_taps),
                        tuple(t_out.tap(tap) for tap in t_taps), **hparams)
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
  feat_dim = _positive_int(spec, "feat_dim", 128)
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
  hparams = _hparams(losses.crd, spec, exclude=("where", "key", "num_negatives", "negative_indices"))
  module = connectors.EmbedPair(pair.s_shape, pair.t_shape, feat_dim, rngs=rngs)
  state = losses.crd_init_state(n, feat_dim, rngs.params())

  def fn(module: Any, inputs: StepInputs, state: Any):
    s = module.student(inputs.student.tap(pair.s_tap), train=True)
    t = module.teacher(_teacher_output(inputs, teacher).tap(pair.t_tap), train=True)
    return losses.crd(s, t, inputs.batch["index"], state, key=inputs.key, num_negatives=num_negatives,
                      **hparams)

  return fn, module, state


# ---------------------------------------------------------------------------------------------
# Distillation from the teacher-output cache (kdlab.teacher_cache).


@register_term("topk_kd")
def _topk_kd(spec: dict[str, Any], *, shapes: Shapes, rngs: Any):
  """KD against the teacher's cached top-k log-probabilities and rest mass (``config.teacher_cache``).

  ``dict(loss="topk_kd", weight=..., temperature=...)``: :func:`kdlab.losses.sequence.topk_kd` of
  the student's ``[B, L, V]`` logits against ``batch["cache/topk_logprobs"]``,
  ``["cache/topk_indices"]`` and ``["cache/rest_logprobs"]`` (merged into every train batch by
  the loop from the cache), over the tokens of ``batch["token_mask"]``. No teacher runs; with
  ``k = V`` it equals ``kd`` against the live teacher.
  """
  from kdlab import teacher_cache
  from kdlab.losses import sequence
  s_tap = spec.pop("student", "logits")
  s_shape = _tap_shape(shapes.student, s_tap, "student").shape
  if len(s_shape) != 3:
    raise UserError(f"topk_kd needs a language model's [batch, length, vocab] logits; student tap {s_tap!r} "
                    f"is {s_shape}")
  batch = shapes.batch or {}
  if not all(key in batch for key in teacher_cache.KEYS):
    raise UserError("topk_kd reads the teacher-output cache: set config.teacher_cache to a directory built by "
                    "kdlab cache-teacher (docs/procedures.md)")
  k = batch["cache/topk_logprobs"].shape[-1]
  if k > s_shape[-1]:
    raise UserError(f"the teacher cache keeps k={k} tokens but the student's vocab size is {s_shape[-1]}")
  hparams = _hparams(sequence.topk_kd, spec, exclude=("rest_logprobs",))

  def fn(connector: Any, inputs: StepInputs, state: Any):
    b = inputs.batch
    return sequence.topk_kd(inputs.student.tap(s_tap), b["cache/topk_logprobs"], b["cache/topk_indices"],
                            b["token_mask"], rest_logprobs=b["cache/rest_logprobs"], **hparams), None

  return fn, None, None
