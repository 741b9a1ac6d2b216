"""The jitted train and eval steps.

One step: frozen teachers (eval mode, ``stop_gradient``) and the student see
the same batch; the objective gives ``(loss, metrics)``; gradients are taken
w.r.t. the learner's parameters only. Metrics are ``(sum, count)`` pairs so
averages stay exact across devices and hosts. What the models read from the
batch and which task metrics are added come from the task
(:mod:`kdlab.train.tasks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdlab.errors import UserError
from kdlab.models.protocol import Unembedding
from kdlab.objective import ModelOutput, Objective, Shapes, StepInputs, build
from kdlab.train import tasks as tasklib
from kdlab.train.state import TrainState

Metrics = dict[str, tuple[jax.Array, jax.Array]]
PACKING_KEYS = ("segment_ids", "positions")  # optional [B, L] keys of packed text batches
TOKEN_NORMALIZATIONS = ("sequence", "global")  # config.train.token_normalization
TEACHER_INPUT = "teacher_tokens"  # the teachers' own tokenization (config.data.teacher_tokenizer)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher's name and graph; its variables ``(params, rest)`` are passed to the step.

  ``taps``: optional feats the objective needs that the model computes only on request
  (``gpt``'s ``attn{i}`` / ``values{i}``).
  """
  name: str
  graphdef: nnx.GraphDef
  taps: tuple[str, ...] = ()
  vocab: int | None = None  # compare only the first ``vocab`` logits (embedding rows past the tokenizer's)
  # The batch key of this teacher's own input (cross-tokenizer distillation: "teacher_tokens", the text
  # tokenized the teacher's way, one unpacked example per row); None: the student's input.
  input_key: str | None = None


def forward(model: nnx.Module, x: jax.Array, *, train: bool, taps: Sequence[str] = (),
            vocab: int | None = None, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None) -> ModelOutput:
  """``model(x)`` as a :class:`ModelOutput`, asking for the optional ``taps`` and, for models with
  an ``unembedding()`` (``gpt``), carrying that ``[D, V]`` matrix (fused token distillation reads it).

  ``vocab``: keep only the first ``vocab`` logits (and unembedding columns): a teacher and a
  student of one tokenizer whose embeddings are padded to different sizes are compared over the
  common columns. ``segment_ids`` / ``positions`` (int ``[B, L]``, packed text rows) are passed to
  the model as keyword arguments only when given (the decoders take them; other models never see
  them).
  """
  kwargs: dict[str, Any] = {}
  if taps:
    kwargs["taps"] = tuple(taps)
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  if positions is not None:
    kwargs["positions"] = positions
  logits, feats = model(x, train=train, **kwargs)
  unembedding = model.unembedding() if isinstance(model, Unembedding) else None
  if getattr(model, "logit_softcap", None):  # logits = c tanh(final @ W / c): no plain unembedding to fuse
    unembedding = None
  if vocab is not None:
    logits = logits[..., :vocab]
    unembedding = None if unembedding is None else unembedding[:, :vocab]
  return ModelOutput(logits, feats, unembedding)


def run_teachers(teachers: Sequence[Teacher], variables: Sequence[Any], x: jax.Array, *,
                 with_taps: bool = True, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, batch: dict[str, Any] | None = None) -> list[ModelOutput]:
  """Each frozen teacher on ``x`` (eval mode, under ``stop_gradient``), with its taps unless not
  ``with_taps``, on packed rows when ``segment_ids`` / ``positions`` are given (see :func:`forward`).
  A teacher with an ``input_key`` reads ``batch[input_key]`` instead (its own tokenization; unpacked)."""
  outs = []
  for teacher, v in zip(teachers, variables):
    if teacher.input_key is not None:
      if batch is None or teacher.input_key not in batch:
        raise ValueError(f"teacher {teacher.name}: its input {teacher.input_key!r} is not in the batch")
      inputs, packed = batch[teacher.input_key], {}
    else:
      inputs, packed = x, dict(segment_ids=segment_ids, positions=positions)
    out = forward(nnx.merge(teacher.graphdef, *v), inputs, train=False, taps=teacher.taps if with_taps else (),
                  vocab=teacher.vocab, **packed)
    outs.append(jax.lax.stop_gradient(out))
  return outs


def objective_for(specs: Sequence[dict[str, Any]], student: nnx.Module, teachers: Sequence[nnx.Module],
                  batch: dict[str, Any], *, num_examples: int, input_key: str = "image", seed: int = 0) -> Objective:
  """Builds ``config.objective``-style ``specs`` for these models on batches shaped like ``batch``.

  The models are traced abstractly (nothing runs); teachers are named ``t0``, ``t1``, ...;
  ``num_examples`` is the training-set size (CRD's memory bank has a row per example).
  """
  x = batch[input_key]
  abstract = lambda m: jax.eval_shape(lambda m, x: forward(m, x, train=False), m, x)  # noqa: E731
  batch_shapes = {k: jax.ShapeDtypeStruct(jnp.shape(v), jnp.asarray(v).dtype) for k, v in batch.items()}
  shapes = Shapes(abstract(student), [abstract(t) for t in teachers], [f"t{i}" for i in range(len(teachers))],
                  num_examples, batch_shapes)
  return build(specs, shapes, nnx.Rngs(seed))


def check_microbatches(batch_size: int, microbatches: Any, data_parallel: int = 1) -> int:
  """``config.train.microbatches`` -> ``k``: the global ``batch_size`` must split into ``k`` equal
  microbatches that each split evenly over the ``data_parallel`` devices of the data axes."""
  k = microbatches
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise UserError(f"config.train.microbatches={k!r}: use a whole number >= 1 (1: no gradient accumulation)")
  if batch_size % (k * data_parallel):
    over = f" each split evenly over the {data_parallel} data-parallel devices" if data_parallel > 1 else ""
    per_device = batch_size // data_parallel if batch_size % data_parallel == 0 else batch_size
    raise UserError(f"config.train.microbatches={k}: config.data.batch_size={batch_size} does not split into {k} "
                    f"equal microbatches{over}; use microbatches dividing {per_device} or a batch_size that is "
                    f"a multiple of {k * data_parallel}")
  return k


def packing(batch: dict[str, Any]) -> dict[str, Any]:
  """The packed-row keys a batch carries (``segment_ids``, ``positions``), as :func:`forward`'s
  keyword arguments; empty for unpacked batches."""
  return {name: batch[name] for name in PACKING_KEYS if name in batch}


def global_token_weights(batch: dict[str, Any]) -> jax.Array:
  """``[B, L]`` float32 ``token_mask * B / N``: ``B`` the rows counted by ``batch["mask"]``, ``N`` the
  tokens they count (``token_mask`` of those rows); all zero when ``N = 0``.

  Token-level terms given these weights return ``sum_l weights * loss`` per sequence, so the
  objective's mean over the ``B`` rows is ``sum(loss * token_mask) / N`` (see :func:`make_train_step`).
  """
  rows = jnp.asarray(batch["mask"]).astype(jnp.float32)
  tokens = jnp.asarray(batch["token_mask"]).astype(jnp.float32) * rows[:, None]
  n = jnp.sum(tokens)
  return tokens * jnp.where(n > 0, jnp.sum(rows) / jnp.where(n > 0, n, 1.0), 0.0)


def split_microbatches(batch: dict[str, Any], k: int) -> dict[str, Any]:
  """``[B, ...]`` entries -> ``[k, B/k, ...]``; microbatch ``j`` holds rows ``j, j + k, j + 2k, ...``.

  Strided rather than contiguous: a batch split over devices in contiguous blocks keeps every
  microbatch split over all of them (each device's block reshapes locally), so no microbatch is
  left to a few devices and nothing moves between devices.
  """

  def one(x):
    x = jnp.asarray(x)
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

  return {name: one(x) for name, x in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, objective: Objective, tx: optax.GradientTransformation,
                    teachers: Sequence[Teacher], ema_decay: Callable[[jax.Array], jax.Array] | None = None,
                    *, term_grad_norms: bool = False, connector_warmup_steps: int = 0,
                    task: tasklib.Task = tasklib.CLASSIFICATION, student_taps: Sequence[str] = (),
                    lr_schedule: optax.Schedule | None = None, microbatches: int = 1,
                    student_vocab: int | None = None, token_normalization: str = "sequence",
                    ) -> Callable[[TrainState, Sequence[Any], dict], tuple[TrainState, Metrics]]:
  """``step(state, teacher_variables, batch) -> (state, metrics)`` (not yet jitted).

  The models read ``batch[task.input_key]``; the student is asked for ``student_taps``
  (each teacher for its own ``Teacher.taps``); ``task.train_metrics`` adds e.g.
  ``train/accuracy``. ``l2_grads`` is the norm of the gradient the optimizer receives (before
  any ``config.optimizer.clip_grad_norm`` clipping, which is part of ``tx``); with
  ``lr_schedule`` (``kdlab.train.optim.learning_rate``) the metric ``lr`` is its value at this
  step (the learning rate this update uses).

  With ``ema_decay`` (``step -> decay``), the EMA of the learner's parameters
  in ``state.ema`` is the last teacher (named "ema") and is updated after the
  optimizer step: ``ema = decay * ema + (1 - decay) * params``.

  With ``term_grad_norms`` (``config.train.term_grad_norms``), each term's weighted
  loss is differentiated on its own and the L2 norm of its gradient w.r.t. the
  student's parameters is logged as ``grad_norm/<term>`` (one extra backward pass
  per term; the forward pass is shared).

  During the first ``connector_warmup_steps`` steps (``config.connector_warmup_steps``)
  only the connectors learn: the student's gradients and updates are zeroed, so its
  parameters stay as they are (its batch statistics still move: it runs in train
  mode). This is RepDistiller's initialisation stage for connectors (e.g. FT's
  paraphraser); the optimizer's step count and schedules run on during it.

  Gradient accumulation (``microbatches = k > 1``, ``config.train.microbatches``): the step
  still receives the whole batch ``[B, ...]`` and splits it into ``k`` microbatches of ``B/k``
  (:func:`split_microbatches`); a ``jax.lax.scan`` runs teachers, student, objective and
  backward pass on one microbatch at a time (activations of one microbatch live at once), the
  gradients are averaged and the optimizer updates once. Metrics are the ``(sum, count)`` sums
  over the microbatches; term states (CRD's memory bank), batch statistics and dropout streams
  (``state.rest``) are carried from one microbatch to the next; microbatch ``j`` folds ``j``
  into the step's key for stochastic terms; the EMA teacher runs with the batch statistics the
  step started with. ``grad_norm/<term>`` is then the mean over microbatches of each
  microbatch's norm (at least the norm of the full batch's gradient).

  The update equals the full batch's exactly (up to float rounding) when the objective is a mean
  of per-example losses and every microbatch holds the same number of examples with
  ``batch["mask"]`` (training batches are all-True): each term averages its per-example losses
  over the masked examples of what it sees, so the mean of the microbatches' gradients is the
  full batch's. Token-level terms qualify whatever the token masks: a sequence's loss is the
  mean over its own real tokens (``token_mask``), so microbatches need not hold the same number
  of tokens. It differs where the loss couples examples of a batch (sp, rkd_*, pkt, cc, info_nce,
  crd's negatives and memory updates), where batch norm normalizes by batch statistics, and
  where dropout draws differ.

  Packed text rows: ``batch["segment_ids"]`` / ``batch["positions"]`` (when present) go to the
  student, the teachers and the EMA teacher (:func:`forward`).

  ``token_normalization`` (``config.train.token_normalization``): ``"sequence"`` (each sequence's
  token losses averaged over its own tokens, then the mean over sequences) or ``"global"``: before
  the microbatch split the step sets ``batch["token_weights"] = token_mask * B / N``
  (:func:`global_token_weights`, over the global batch, so it does not depend on the devices) and
  the token-level terms return ``l_b = sum_l w_bl loss_bl``. The objective averages per-example
  losses over the ``C_j`` rows of ``batch["mask"]`` in each microbatch and the step averages the
  ``k`` microbatches:
      mean_j (1/C_j) sum_{b in j} l_b = (1/B) sum_b (B/N) sum_l m_bl loss_bl = sum_bl m_bl loss_bl / N
  as ``C_j = B/k`` (training batches are all-True and split into equal microbatches): one mean per
  token over the whole global batch, the same for any ``k`` and any data-parallel size. Batches
  without ``token_mask`` (one prediction per example) are left as they are.
  """
  if token_normalization not in TOKEN_NORMALIZATIONS:
    raise UserError(f"config.train.token_normalization={token_normalization!r}: must be one of "
                    f"{', '.join(map(repr, TOKEN_NORMALIZATIONS))}; use e.g. 'global'")
  if isinstance(connector_warmup_steps, bool) or not isinstance(connector_warmup_steps, int) \
      or connector_warmup_steps < 0:
    raise UserError(f"config.connector_warmup_steps must be an int >= 0, got {connector_warmup_steps!r}")
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise UserError(f"config.train.microbatches={microbatches!r}: use a whole number >= 1 "
                    f"(1: no gradient accumulation)")

  def grads_of(state: TrainState, teacher_variables: Sequence[Any], batch: dict, rest: Any, term_states: Any,
               key: jax.Array) -> tuple[Any, Metrics, Metrics, Any, Any]:
    """Forward and backward on one (micro)batch: ``(grads, metrics, task_metrics, term_states, rest)``."""
    ones = jnp.ones((), jnp.float32)
    x, packed = batch[task.input_key], packing(batch)
    t_outs = run_teachers(teachers, teacher_variables, x, batch=batch, **packed)
    if ema_decay is not None:
      ema_student = nnx.merge(graphdef, state.ema, state.rest).student
      t_outs.append(jax.lax.stop_gradient(forward(ema_student, x, train=False, taps=student_taps,
                                                  vocab=student_vocab, **packed)))

    def run(params, per_term: bool):
      learner = nnx.merge(graphdef, params, rest)
      s_out = forward(learner.student, x, train=True, taps=student_taps, vocab=student_vocab, **packed)
      inputs = StepInputs(s_out, t_outs, batch, state.step, key)
      out = objective.evaluate(learner.connectors, inputs, term_states, per_term=per_term)
      # A fused pass gives the argmax tokens: then nothing reads the student's [B, L, V] logits.
      predictions = jnp.argmax(s_out.logits, -1) if out.predictions is None else out.predictions
      _, _, new_rest = nnx.split(learner, nnx.Param, ...)
      return out.losses if per_term else out.total, (out.metrics, out.states, nnx.to_pure_dict(new_rest),
                                                     jax.lax.stop_gradient(predictions))

    if term_grad_norms:
      weighted, pullback, (metrics, new_term_states, new_rest, predictions) = jax.vjp(
          lambda p: run(p, True), state.params, has_aux=True)
      names = list(weighted)
      (grads,) = pullback({name: ones for name in names})

      def term_grad_norm(name):
        (term_grads,) = pullback({n: ones if n == name else jnp.zeros_like(ones) for n in names})
        return optax.tree.norm(term_grads["student"])

      # One backward pass per term, unrolled: in a lax.map loop body XLA:CPU ran the convolution
      # backward passes about 20x slower (mnist5k resnet8 with ce + at: 3 s per step; unrolled, the
      # step with the norms takes 1.4x the step without them).
      norms = [term_grad_norm(name) for name in names]
      metrics = dict(metrics)
      for i, name in enumerate(names):
        metrics[f"grad_norm/{name}"] = (norms[i], ones)
    else:
      (_, (metrics, new_term_states, new_rest, predictions)), grads = jax.value_and_grad(
          lambda p: run(p, False), has_aux=True)(state.params)
    return grads, dict(metrics), task.train_metrics(predictions, batch), new_term_states, new_rest

  def accumulated(state: TrainState, teacher_variables: Sequence[Any], batch: dict, key: jax.Array
                  ) -> tuple[Any, Metrics, Metrics, Any, Any]:
    """:func:`grads_of` over ``microbatches`` microbatches: mean gradients, summed metrics."""
    k = microbatches
    size = jnp.shape(batch[task.input_key])[0]
    if size % k:
      raise UserError(f"config.train.microbatches={k}: the batch of {size} does not split into {k} equal "
                      f"microbatches; use a batch_size that is a multiple of {k}")

    def body(carry, xs):
      grad_sum, term_states, rest = carry
      micro, j = xs
      grads, metrics, task_metrics, term_states, rest = grads_of(
          state, teacher_variables, micro, rest, term_states, jax.random.fold_in(key, j))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (grad_sum, term_states, rest), (metrics, task_metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, term_states, rest), (metrics, task_metrics) = jax.lax.scan(
        body, (zeros, state.term_states, state.rest), (split_microbatches(batch, k), jnp.arange(k)))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    total = lambda m: {name: (jnp.sum(s, 0), jnp.sum(c, 0)) for name, (s, c) in m.items()}  # noqa: E731
    return grads, total(metrics), total(task_metrics), term_states, rest

  def step(state: TrainState, teacher_variables: Sequence[Any], batch: dict) -> tuple[TrainState, Metrics]:
    ones = jnp.ones((), jnp.float32)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    if token_normalization == "global" and "token_mask" in batch:
      batch = {**batch, "token_weights": global_token_weights(batch)}
    if microbatches == 1:
      grads, metrics, task_metrics, term_states, rest = grads_of(state, teacher_variables, batch, state.rest,
                                                                 state.term_states, key)
    else:
      grads, metrics, task_metrics, term_states, rest = accumulated(state, teacher_variables, batch, key)
    warm = state.step < connector_warmup_steps

    def freeze(tree):
      return jax.tree.map(lambda x: jnp.where(warm, jnp.zeros_like(x), x), tree)

    if connector_warmup_steps:
      grads = {**grads, "student": freeze(grads["student"])}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if connector_warmup_steps:  # Weight decay would still move the student: zero its updates too.
      updates = {**updates, "student": freeze(updates["student"])}
    params = optax.apply_updates(state.params, updates)
    metrics["l2_grads"] = (optax.tree.norm(grads), ones)
    metrics["l2_params"] = (optax.tree.norm(params), ones)
    metrics["l2_updates"] = (optax.tree.norm(updates), ones)
    if lr_schedule is not None:
      metrics["lr"] = (jnp.asarray(lr_schedule(state.step), jnp.float32), ones)
    metrics.update(task_metrics)
    ema = state.ema
    if ema_decay is not None:
      decay = ema_decay(state.step)
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
      metrics["ema/decay"] = (decay, ones)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params, rest=rest,
                                    opt_state=opt_state, term_states=term_states, ema=ema)
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, teachers: Sequence[Teacher], task: tasklib.Task,
                   student_vocab: int | None = None
                   ) -> Callable[[TrainState, Sequence[Any], dict, jax.Array], Metrics]:
  """``eval_step(state, teacher_variables, batch, logit_offset) -> metrics`` of the student.

  The metrics are the task's (:meth:`kdlab.train.tasks.Task.eval_metrics`), computed
  against the first teacher when there is one. ``logit_offset [C]`` is added to the
  student's logits (e.g. a bias correction).
  """

  def eval_step(state: TrainState, teacher_variables: Sequence[Any], batch: dict,
                logit_offset: jax.Array) -> Metrics:
    learner = nnx.merge(graphdef, state.params, state.rest)
    x, packed = batch[task.input_key], packing(batch)
    s_out = forward(learner.student, x, train=False, vocab=student_vocab, **packed)
    t_out = (run_teachers(teachers[:1], teacher_variables[:1], x, with_taps=False, batch=batch, **packed)[0]
             if teachers else None)
    return task.eval_metrics(s_out, t_out, batch, logit_offset)

  return eval_step


def reduce_metrics(totals: dict[str, Any]) -> dict[str, Any]:
  """``{name: (sum, count)}`` -> ``{name: sum / count}`` (vectors become lists).

  Names ending in ``errors``/``errors_per_class`` are counts: reported as sums.
  """
  out = {}
  for name, (s, c) in totals.items():
    value = jax.device_get(s) if name.endswith(("errors", "errors_per_class")) else jax.device_get(s) / jax.device_get(c)
    out[name] = value.tolist() if getattr(value, "ndim", 0) else float(value)
  return out


def accumulate(totals: dict[str, Any], metrics: Metrics) -> dict[str, Any]:
  """Adds one step's ``(sum, count)`` metrics into running totals."""
  for name, (s, c) in metrics.items():
    if name in totals:
      ts, tc = totals[name]
      totals[name] = (ts + s, tc + c)
    else:
      totals[name] = (s, c)
  return totals
