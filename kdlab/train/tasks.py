"""What differs between training tasks: image classification and language modelling.

The loop (:mod:`kdlab.train.loop`) and the train step (:mod:`kdlab.train.step`) are shared; a
task says which batch entry the models read (``input_key``), how the splits are loaded and
batched, what is checked about the models at start-up, which metrics the train and eval steps
add, and what ``summary.json`` holds. :func:`for_source` picks the task from
``config.data.source``: text corpora (``pysrc``), generated data (``generated:DIR``) and local
instruction data (``jsonl:PATH``, ``parquet:PATH``) are language modelling, the rest classification.

Classification: ``image`` in, ``[B, C]`` logits, eval metrics ``test/*`` (accuracy, errors,
per-class errors, CE) and, against ``config.teachers[0]``, ``agreement/top1`` and
``test/kl_teacher``.

Language modelling: ``tokens [B, L]`` in, ``[B, L, V]`` logits; eval metrics per token over the
validation split (token-weighted, padding excluded): ``val/loss`` (CE, nats per token),
``val/ppl`` (``exp(val/loss)``), ``val/accuracy`` (next-token top-1), and against
``config.teachers[0]`` ``val/kl_teacher`` (``KL(p_teacher || p_student)`` at T = 1),
``agreement/top1`` (same argmax token) and ``val/teacher_loss`` (the teacher's own CE).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from kdlab import data as kdata
from kdlab.config import show
from kdlab.data import generated, instruct, pipeline, text
from kdlab.data.augment import AUGMENTATIONS
from kdlab.errors import UserError
from kdlab.objective import ModelOutput

Metrics = dict[str, tuple[jax.Array, jax.Array]]


class Task(abc.ABC):
  """The task interface; see :class:`Classification` and :class:`LanguageModel`."""

  name: str
  input_key: str          # the batch entry the models read
  best_key: str           # the eval metric tracked for the summary's best_* fields
  higher_is_better: bool
  headline_fields: tuple[str, ...]  # summary fields averaged over vmapped seeds

  @abc.abstractmethod
  def load(self, data_cfg: Any) -> tuple[Any, Any]:
    """``(train_source, eval_source)``; bad data fields raise :class:`UserError`."""

  @abc.abstractmethod
  def abstract_batch(self, source: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch as ``ShapeDtypeStruct``s (what ``prepare`` traces models and terms on)."""

  def check_models(self, student: Any, teachers: Sequence[Any], teacher_fields: Sequence[str],
                   data_cfg: Any) -> None:
    """Start-up checks on the (abstract) models before any forward pass."""

  @abc.abstractmethod
  def check_outputs(self, s_out: ModelOutput, t_outs: Sequence[ModelOutput], source: Any, data_cfg: Any) -> None:
    """Start-up checks on the models' abstract outputs."""

  @abc.abstractmethod
  def train_dataset(self, source: Any, data_cfg: Any, seed: int, rows: tuple[int, int] | None = None
                    ) -> grain.MapDataset:
    """The shuffled, augmented, batched training data for ``seed`` (only ``rows`` of each batch if given:
    this process's share, see :func:`kdlab.mesh.process_rows`)."""

  @abc.abstractmethod
  def eval_batches(self, source: Any, data_cfg: Any, rows: tuple[int, int] | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-order eval batches, padded with a ``mask`` entry (``rows`` as in :meth:`train_dataset`)."""

  @abc.abstractmethod
  def train_metrics(self, predictions: jax.Array, batch: dict) -> Metrics:
    """``(sum, count)`` training metrics of the student's argmax ``predictions`` (``[B]`` classes or
    ``[B, L]`` tokens) on ``batch``."""

  @abc.abstractmethod
  def eval_metrics(self, s_out: ModelOutput, t_out: ModelOutput | None, batch: dict,
                   logit_offset: jax.Array) -> Metrics:
    """``(sum, count)`` eval metrics, against the first teacher's outputs when given."""

  def finalize(self, values: dict[str, Any]) -> dict[str, Any]:
    """Metrics derived after the ``(sum, count)`` reduction."""
    return values

  def better(self, a: float, b: float) -> bool:
    """Whether eval value ``a`` of ``best_key`` beats ``b``."""
    return a > b if self.higher_is_better else a < b

  @abc.abstractmethod
  def summary(self, values: dict[str, Any], best: float | None, source: Any, steps: int) -> dict[str, Any]:
    """The task's fields of ``summary.json`` from the final eval ``values``."""

  @abc.abstractmethod
  def headline(self, summary: dict[str, Any]) -> str:
    """One line for the CLI and sweep logs."""


def _teacher_agreement(s_logits: jax.Array, t_logits: jax.Array, weights: jax.Array, count: jax.Array,
                       prefix: str) -> Metrics:
  log_p = jax.nn.log_softmax(s_logits)
  log_q = jax.nn.log_softmax(t_logits.astype(jnp.float32))
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)
  agree = (jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)).astype(jnp.float32)
  return {"agreement/top1": (jnp.sum(agree * weights), count), f"{prefix}/kl_teacher": (jnp.sum(kl * weights), count)}


class Classification(Task):
  """Image classification (``mnist5k``, ``digits``, ``tfds:NAME``): kdlab's original task."""

  name = "classification"
  input_key = "image"
  best_key = "test/accuracy"
  higher_is_better = True
  headline_fields = ("test_accuracy",)

  def load(self, data_cfg: Any) -> tuple[kdata.Source, kdata.Source]:
    train_source = kdata.load(data_cfg.source, "train", data_dir=data_cfg.get("data_dir"))
    train_source = train_source.without_labels(list(data_cfg.get("exclude_labels", ())))
    test_source = kdata.load(data_cfg.source, "test", data_dir=data_cfg.get("data_dir"))
    _check_normalization(data_cfg, train_source.image_shape[-1])
    augment = data_cfg.get("augment")
    if augment is not None and (not isinstance(augment, str) or augment not in AUGMENTATIONS):
      raise UserError(f"config.data.augment={show(augment)}: unknown augmentation; use one of "
                      f"{', '.join(sorted(AUGMENTATIONS))} or None")
    return train_source, test_source

  def abstract_batch(self, source: kdata.Source, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((batch_size, *source.image_shape), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

  def check_outputs(self, s_out: ModelOutput, t_outs: Sequence[ModelOutput], source: kdata.Source,
                    data_cfg: Any) -> None:
    for i, t_out in enumerate(t_outs):
      if t_out.logits.shape[-1] != s_out.logits.shape[-1]:
        raise UserError(f"config.teachers[{i}]: the teacher predicts {t_out.logits.shape[-1]} classes but the "
                        f"student {s_out.logits.shape[-1]}; use models with the same num_classes")
    if s_out.logits.shape[-1] != source.num_classes:
      raise UserError(f"config.model.num_classes: the model predicts {s_out.logits.shape[-1]} classes but "
                      f"{data_cfg.source} has {source.num_classes}")

  def train_dataset(self, source: kdata.Source, data_cfg: Any, seed: int, rows: tuple[int, int] | None = None
                    ) -> grain.MapDataset:
    return kdata.train_dataset(source, batch_size=data_cfg.batch_size, seed=seed, augment=data_cfg.augment,
                               mean=data_cfg.mean, std=data_cfg.std, rows=rows)

  def eval_batches(self, source: kdata.Source, data_cfg: Any, rows: tuple[int, int] | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    return kdata.eval_batches(source, batch_size=data_cfg.eval_batch_size, mean=data_cfg.mean, std=data_cfg.std,
                              rows=rows)

  def train_metrics(self, predictions: jax.Array, batch: dict) -> Metrics:
    mask = batch["mask"].astype(jnp.float32)
    correct = (predictions == batch["label"]).astype(jnp.float32)
    return {"train/accuracy": (jnp.sum(correct * mask), jnp.sum(mask))}

  def eval_metrics(self, s_out: ModelOutput, t_out: ModelOutput | None, batch: dict,
                   logit_offset: jax.Array) -> Metrics:
    """``test/accuracy``, ``test/ce``, ``test/errors``, ``test/errors_per_class`` (``[C]``); with a teacher
    ``agreement/top1`` and ``test/kl_teacher``; for models with auxiliary exits (feats
    ``exit{i}_logits``) ``test/accuracy_exit{i}`` and ``test/accuracy_exits_ensemble``."""
    logits, feats = s_out.logits.astype(jnp.float32) + logit_offset, s_out.feats
    num_classes = logits.shape[-1]
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    pred = jnp.argmax(logits, -1)
    wrong = (pred != batch["label"]).astype(jnp.float32) * mask
    log_p = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_p, batch["label"][:, None], -1)[:, 0]
    per_class = jax.ops.segment_sum(wrong, batch["label"], num_segments=num_classes)
    metrics: Metrics = {
        "test/accuracy": (count - jnp.sum(wrong), count),
        "test/errors": (jnp.sum(wrong), jnp.ones((), jnp.float32)),
        "test/errors_per_class": (per_class, jnp.ones((), jnp.float32)),
        "test/ce": (jnp.sum(nll * mask), count),
    }
    exits = sorted(k for k in feats if k.startswith("exit") and k.endswith("_logits"))
    if exits:  # Models with auxiliary exits (BYOT): each exit's accuracy and the ensemble of all exits.
      all_log_p = [jax.nn.log_softmax(feats[k].astype(jnp.float32)) for k in exits] + [log_p]
      for k, exit_log_p in zip(exits, all_log_p):
        right = (jnp.argmax(exit_log_p, -1) == batch["label"]).astype(jnp.float32)
        metrics[f"test/accuracy_{k.removesuffix('_logits')}"] = (jnp.sum(right * mask), count)
      ensemble = jax.nn.logsumexp(jnp.stack(all_log_p), axis=0)
      right = (jnp.argmax(ensemble, -1) == batch["label"]).astype(jnp.float32)
      metrics["test/accuracy_exits_ensemble"] = (jnp.sum(right * mask), count)
    if t_out is not None:
      metrics.update(_teacher_agreement(logits, t_out.logits, mask, count, "test"))
    return metrics

  def summary(self, values: dict[str, Any], best: float | None, source: kdata.Source, steps: int) -> dict[str, Any]:
    return {
        "steps": steps,
        "test_accuracy": values["test/accuracy"],
        "best_test_accuracy": max(best if best is not None else -1.0, values["test/accuracy"]),
        "test_errors": int(values["test/errors"]),
        "test_errors_per_class": [int(e) for e in values["test/errors_per_class"]],
        "test_examples": len(source),
        "test_ce": values["test/ce"],
        "agreement_top1": values.get("agreement/top1"),
        "kl_teacher": values.get("test/kl_teacher"),
    }

  def headline(self, summary: dict[str, Any]) -> str:
    line = f"test accuracy {summary['test_accuracy']:.4f}"
    if "test_errors" in summary:  # A vmapped group's summary has the mean accuracy only.
      line += f" ({summary['test_errors']} errors of {summary['test_examples']})"
    return line


def _check_normalization(data_cfg: Any, channels: int) -> None:
  """``config.data.mean`` / ``std``: one finite number per channel (or one for all), the stds > 0."""
  for key, default in (("mean", (0.0,)), ("std", (1.0,))):
    value = data_cfg.get(key, default)
    values = list(value) if isinstance(value, (list, tuple)) else None
    ok = values is not None and len(values) in (1, channels) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (key == "mean" or v > 0)
        for v in values)
    if not ok:
      what = "finite numbers" if key == "mean" else "numbers > 0"
      raise UserError(f"config.data.{key}={show(value)}: must be a list of {what}, one per channel ({channels}) or one "
                      f"for all; use e.g. --config.data.{key}=({default[0]},)")


def _positive_int(data_cfg: Any, key: str, default: Any, allow_none: bool = False) -> int | None:
  value = data_cfg.get(key, default)
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f"config.data.{key} must be an int >= 1{' or None' if allow_none else ''}, got {show(value)}")
  return value


class LanguageModel(Task):
  """Next-token prediction on packed text (``pysrc``, ``generated:DIR``, ``jsonl:PATH``, ``parquet:PATH``);
  models take ``tokens [B, L]``.

  Data fields: ``seq_len`` (tokens per sequence), ``max_bytes`` / ``eval_max_bytes`` (text read
  for the train / validation split; None for all; not used by ``jsonl:``/``parquet:``, which read
  whole files), ``batch_size``, ``eval_batch_size``, ``tokenizer``; for ``jsonl:``/``parquet:`` also
  ``chat_template``, ``loss_mask``, ``packing``, ``drop_long``, ``validation_fraction``
  (:mod:`kdlab.data.instruct`). Their batches carry ``segment_ids`` and ``positions`` ``[B, L]``.
  With ``teacher_tokenizer`` (and ``teacher_seq_len``; ``jsonl:``/``parquet:`` only) they also carry the
  teacher's own tokenization and the aligned chunks (:mod:`kdlab.data.pipeline`), and teachers may
  have the teacher tokenizer's vocabulary instead of the student's.
  """

  name = "language_model"
  input_key = "tokens"
  best_key = "val/loss"
  higher_is_better = False
  headline_fields = ("val_loss", "val_ppl", "val_accuracy", "kl_teacher", "agreement_top1")

  def load(self, data_cfg: Any) -> tuple[text.TextSource, text.TextSource]:
    if "seq_len" not in data_cfg:
      raise UserError(f"config.data.seq_len: missing; text source {data_cfg.source!r} needs the tokens per "
                      f"sequence (e.g. 128)")
    seq_len = _positive_int(data_cfg, "seq_len", None)
    max_bytes = _positive_int(data_cfg, "max_bytes", None, allow_none=True)
    eval_max_bytes = _positive_int(data_cfg, "eval_max_bytes", None, allow_none=True)
    teacher_tokenizer = data_cfg.get("teacher_tokenizer")
    if teacher_tokenizer is not None and not instruct.is_instruct_source(data_cfg.source):
      raise UserError(f"config.data.teacher_tokenizer={show(teacher_tokenizer)}: the teacher's own tokenization needs "
                      f"examples from jsonl:PATH or parquet:PATH, not {data_cfg.source!r}; use such a source or "
                      f"teacher_tokenizer=None")
    if generated.is_generated(data_cfg.source):  # teacher samples (kdlab generate-data): sequence-level KD
      return generated.load_splits(data_cfg.source, seq_len=seq_len, eval_max_bytes=eval_max_bytes)
    if instruct.is_instruct_source(data_cfg.source):  # chats, prompt/completion pairs, texts from local files
      return instruct.load(data_cfg.source, instruct.options(data_cfg, seq_len))
    try:
      tokenizer = data_cfg.get("tokenizer") or "byte"
      train = text.load_text(data_cfg.source, "train", seq_len=seq_len, max_bytes=max_bytes, tokenizer=tokenizer)
      val = text.load_text(data_cfg.source, "validation", seq_len=seq_len, max_bytes=eval_max_bytes,
                           tokenizer=tokenizer)
    except ValueError as e:
      raise UserError(f"config.data: {e}") from None
    return train, val

  def abstract_batch(self, source: text.TextSource, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch_size, source.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
             "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
             "token_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
             "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
    if getattr(source.records, "segment_ids", None) is not None:  # packed examples
      batch["segment_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32)
      batch["positions"] = jax.ShapeDtypeStruct(shape, jnp.int32)
    for key, values in getattr(source.records, "extra", {}).items():  # the teacher's tokenization (cross-tokenizer)
      batch[key] = jax.ShapeDtypeStruct((batch_size, *values.shape[1:]), values.dtype)
    return batch

  def check_models(self, student: Any, teachers: Sequence[Any], teacher_fields: Sequence[str],
                   data_cfg: Any) -> None:
    seq_len = data_cfg.seq_len
    t_len, t_key = seq_len, "seq_len"
    if data_cfg.get("teacher_tokenizer") and data_cfg.get("teacher_seq_len") not in (None, seq_len):
      t_len, t_key = data_cfg.teacher_seq_len, "teacher_seq_len"  # teachers read their own tokenization
    for model, field, length, key in ((student, "config.model", seq_len, "seq_len"),
                                      *((t, f, t_len, t_key) for t, f in zip(teachers, teacher_fields))):
      max_len = getattr(model, "max_len", None)
      if max_len is not None and length > max_len:
        raise UserError(f"config.data.{key}={length} exceeds {field}.max_len={max_len}; shorten {key} "
                        f"or use a model with a longer max_len")

  def check_outputs(self, s_out: ModelOutput, t_outs: Sequence[ModelOutput], source: text.TextSource,
                    data_cfg: Any) -> None:
    if s_out.logits.ndim != 3:
      raise UserError(f"config.model: text source {data_cfg.source!r} needs a language model returning "
                      f"[batch, length, vocab] logits (e.g. name='gpt'), got logits {s_out.logits.shape}")
    vocab = s_out.logits.shape[-1]
    if vocab < source.vocab_size:
      raise UserError(f"config.model.vocab_size={vocab} is smaller than the {source.vocab_size} tokens of "
                      f"{data_cfg.source}'s tokenizer; use vocab_size={source.vocab_size}")
    t_vocab = getattr(source, "teacher_vocab_size", None)  # the source carries the teacher's own tokenization
    for i, t_out in enumerate(t_outs):
      size = t_out.logits.shape[-1]
      if t_out.logits.ndim == 3 and (size == vocab or (t_vocab is not None and size >= t_vocab)):
        continue
      if t_vocab is not None and t_out.logits.ndim == 3:
        raise UserError(f"config.teachers[{i}]: the teacher's vocab_size={size} is smaller than the {t_vocab} tokens "
                        f"of config.data.teacher_tokenizer={show(data_cfg.teacher_tokenizer)} (and not the student's "
                        f"{vocab}); use the teacher that tokenizer belongs to")
      raise UserError(f"config.teachers[{i}]: the teacher's vocab_size is {size} but the student's {vocab}; distil "
                      f"between models with the same vocab_size (and tokenizer), or set config.data.teacher_tokenizer "
                      f"to the teacher's tokenizer (cross-tokenizer distillation)")

  def train_dataset(self, source: text.TextSource, data_cfg: Any, seed: int, rows: tuple[int, int] | None = None
                    ) -> grain.MapDataset:
    return pipeline.text_train_dataset(source, batch_size=data_cfg.batch_size, seed=seed, rows=rows)

  def eval_batches(self, source: text.TextSource, data_cfg: Any, rows: tuple[int, int] | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    return pipeline.text_eval_batches(source, batch_size=data_cfg.eval_batch_size, rows=rows)

  @staticmethod
  def _weights(batch: dict) -> jax.Array:
    return batch["token_mask"].astype(jnp.float32) * batch["mask"].astype(jnp.float32)[:, None]

  def train_metrics(self, predictions: jax.Array, batch: dict) -> Metrics:
    w = self._weights(batch)
    correct = (predictions == batch["targets"]).astype(jnp.float32)
    return {"train/accuracy": (jnp.sum(correct * w), jnp.sum(w))}

  def eval_metrics(self, s_out: ModelOutput, t_out: ModelOutput | None, batch: dict,
                   logit_offset: jax.Array) -> Metrics:
    logits = s_out.logits.astype(jnp.float32) + logit_offset
    w = self._weights(batch)
    count = jnp.sum(w)
    targets = batch["targets"]

    def nll(x):
      return -jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0]

    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    metrics: Metrics = {"val/loss": (jnp.sum(nll(logits) * w), count),
                        "val/accuracy": (jnp.sum(correct * w), count)}
    if t_out is not None and "teacher_tokens" in batch:
      # A teacher of another tokenizer read its own tokens: its loss per its own token; no token-by-token
      # comparison with the student.
      t_logits = t_out.logits.astype(jnp.float32)
      t_w = batch["teacher_token_mask"].astype(jnp.float32) * batch["mask"].astype(jnp.float32)[:, None]
      t_nll = -jnp.take_along_axis(jax.nn.log_softmax(t_logits), batch["teacher_targets"][..., None], -1)[..., 0]
      metrics["val/teacher_loss"] = (jnp.sum(t_nll * t_w), jnp.sum(t_w))
    elif t_out is not None:
      t_logits = t_out.logits.astype(jnp.float32)
      metrics.update(_teacher_agreement(logits, t_logits, w, count, "val"))
      metrics["val/teacher_loss"] = (jnp.sum(nll(t_logits) * w), count)
    return metrics

  def finalize(self, values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    values["val/ppl"] = math.exp(values["val/loss"])
    return values

  def summary(self, values: dict[str, Any], best: float | None, source: text.TextSource,
              steps: int) -> dict[str, Any]:
    best = values["val/loss"] if best is None else min(best, values["val/loss"])
    return {
        "steps": steps,
        "val_loss": values["val/loss"],
        "best_val_loss": best,
        "val_ppl": values["val/ppl"],
        "best_val_ppl": math.exp(best),
        "val_accuracy": values["val/accuracy"],
        "val_tokens": source.records.num_tokens,
        "kl_teacher": values.get("val/kl_teacher"),
        "agreement_top1": values.get("agreement/top1"),
        "teacher_val_loss": values.get("val/teacher_loss"),
        **(_example_counts(source.stats) if isinstance(source, instruct.InstructSource) else {}),
    }

  def headline(self, summary: dict[str, Any]) -> str:
    line = f"val loss {summary['val_loss']:.4f} nats/token (ppl {summary['val_ppl']:.3f})"
    if summary.get("kl_teacher") is not None:
      line += f", KL(teacher || student) {summary['kl_teacher']:.4f}"
    if summary.get("agreement_top1") is not None:
      line += f", top-1 agreement {summary['agreement_top1']:.4f}"
    return line


def _example_counts(stats: dict[str, dict[str, int]]) -> dict[str, int]:
  """Summary fields of a ``jsonl:``/``parquet:`` source: examples per split, and those dropped or cut at seq_len."""
  return {"train_examples": stats["train"]["examples"], "val_examples": stats["validation"]["examples"],
          "dropped_long": sum(s["dropped"] for s in stats.values()),
          "truncated_examples": sum(s["truncated"] for s in stats.values())}


CLASSIFICATION = Classification()
LANGUAGE_MODEL = LanguageModel()


def for_source(source: str) -> Task:
  """The task of ``config.data.source``."""
  if text.is_text_source(source) or generated.is_generated(source) or instruct.is_instruct_source(source):
    return LANGUAGE_MODEL
  return CLASSIFICATION


def for_summary(summary: dict[str, Any]) -> Task:
  """The task that wrote ``summary`` (a run's ``summary.json``)."""
  return LANGUAGE_MODEL if "val_loss" in summary and "test_accuracy" not in summary else CLASSIFICATION


def describe_summary(summary: dict[str, Any]) -> str:
  """One line for any run's summary (the CLI's result line)."""
  return for_summary(summary).headline(summary)
