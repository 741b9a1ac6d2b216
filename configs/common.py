"""Pieces shared by the config files (``configs/`` is on ``sys.path`` while kdlab loads a config)."""

from __future__ import annotations

from typing import Sequence

import ml_collections


def parse_arg(arg: str | None, variants: Sequence[str], default: str, *,
              options: Sequence[str]) -> tuple[str, dict[str, str]]:
  """``"kd,source=digits,quick"`` -> ``("kd", {"source": "digits", "quick": ""})``.

  ``options`` are the option names the config file reads (its ``OPTIONS``); any other name is an
  error listing them, so a misspelled option never trains as if it were not there.
  """
  parts = [p for p in (arg or default).split(",") if p]
  variant, given = parts[0], {}
  for p in parts[1:]:
    key, _, value = p.partition("=")
    given[key] = value
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(variants)}")
  unknown = [k for k in given if k not in options]
  if unknown:
    raise ValueError(f"unknown option {unknown[0]!r}; the options of this config are {', '.join(options)} "
                     f"(VARIANT,OPTION=VALUE,...)")
  return variant, given


# The options :func:`mnist_mlp` reads; configs built on it accept these and their own.
MLP_OPTIONS = ("source", "epochs", "omit", "quick")


def mnist_mlp(variant: str, options: dict[str, str]) -> ml_collections.ConfigDict:
  """The MLPs of Hinton et al. 2015 on an MNIST-like source.

  ``variant`` "teacher": 2x1200, dropout 0.5 (0.2 on inputs), +/-2 pixel jitter, 60 epochs;
  otherwise the 2x800 student without regularization, 40 epochs, CE only. Options: ``source``,
  ``epochs``, ``omit`` (digits to drop from the training set, "/"-separated), ``quick``.
  """
  source = options.get("source", "mnist5k")
  in_features = 64 if source == "digits" else 784
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", -1)]
  c.sharding_rules = []
  c.data = ml_collections.ConfigDict(dict(
      source=source, data_dir=None, batch_size=100, eval_batch_size=512,
      augment="jitter" if variant == "teacher" else None,
      mean=(0.0,), std=(1.0,),
      exclude_labels=[int(d) for d in options["omit"].split("/")] if "omit" in options else [],
      # grain threads preparing training batches ahead; 0 = in the training loop's thread. Batches here
      # cost ~0.3 ms, and on 2 cores prefetch threads only compete with XLA's (MNIST MLP: 9.1 -> 6.0 ms
      # per step with 0); raise it where spare cores can run costly augmentation ahead.
      prefetch_threads=0))
  c.model = ml_collections.ConfigDict(dict(
      name="mlp", in_features=in_features, num_classes=10,
      hidden=(1200, 1200) if variant == "teacher" else (800, 800),
      dropout=0.5 if variant == "teacher" else 0.0,
      input_dropout=0.2 if variant == "teacher" else 0.0))
  c.teachers = []
  c.objective = [dict(loss="ce", weight=1.0)]
  c.ema_teacher = None  # e.g. dict(decay=0.999): a teacher named "ema", the EMA of the student.
  c.born_again = None   # e.g. dict(generations=3, ensemble=True): a born-again chain.
  c.connector_warmup_steps = 0  # N > 0: the first N steps train only the connectors (student frozen).
  c.vmap_seeds = 0      # S > 1: train seeds seed..seed+S-1 in one vmapped step (outputs in WORKDIR/seed{k}).
  epochs = float(options.get("epochs", 60 if variant == "teacher" else 40))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1 if variant == "teacher" else 0.05, momentum=0.9, nesterov=False,
      weight_decay=0.0, schedule="cosine", warmup_epochs=0.0, boundaries_epochs=[], decay=0.1))
  c.train = ml_collections.ConfigDict(dict(
      num_epochs=epochs, num_steps=0, log_every_steps=40, eval_every_epochs=5.0, checkpoint_every_epochs=5.0,
      term_grad_norms=False))  # True: log grad_norm/<term> (one extra backward pass per term).
  c.wandb_project = "kdlab"
  if "quick" in options:
    c.data.batch_size = 40
    c.model.hidden = (64, 64)
    c.model.dropout = min(c.model.dropout, 0.1)
    c.model.input_dropout = 0.0
    if source == "digits":
      c.data.augment = None  # +/-2 pixels is a quarter of an 8x8 image.
    c.train.num_epochs = 1.0
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
    c.train.eval_every_epochs = 0.5
    c.train.checkpoint_every_epochs = 0.25
    c.train.log_every_steps = 10
  return c


def lm_training(c: ml_collections.ConfigDict, *, steps: int, learning_rate: float, log_every: int,
                keep: int = 2) -> ml_collections.ConfigDict:
  """The run sections shared by the pretrained-LLM configs: no EMA/born-again/warm-up/vmapped seeds,
  AdamW with a cosine schedule and clipping at 1, ``steps`` steps, evaluation and a checkpoint at the
  end only (``keep`` kept)."""
  c.ema_teacher = None
  c.born_again = None
  c.connector_warmup_steps = 0
  c.vmap_seeds = 0
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=learning_rate, weight_decay=0.01, schedule="cosine", warmup_epochs=0.0,
      boundaries_epochs=[], decay=0.1, clip_grad_norm=1.0, kwargs={}))
  c.train = ml_collections.ConfigDict(dict(
      num_epochs=0.0, num_steps=steps, log_every_steps=log_every, eval_every_epochs=1e9,
      checkpoint_every_epochs=1e9, term_grad_norms=False, microbatches=1))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=keep, best_metric=None, best_mode=None))
  c.wandb_project = "kdlab"
  return c


def on_policy(fraction: float | None, max_new_tokens: int, temperature: float) -> ml_collections.ConfigDict | None:
  """``config.on_policy``: for a ``fraction`` of the batches the student samples ``max_new_tokens``
  tokens per prompt at ``temperature`` (no top-k / top-p; the prompt is the data's own). None: off."""
  if fraction is None:
    return None
  return ml_collections.ConfigDict(dict(fraction=fraction, max_new_tokens=max_new_tokens, temperature=temperature,
                                        prompt_len=None, top_k=None, top_p=None))


def generate_data(source: str, max_new_tokens: int, temperature: float) -> ml_collections.ConfigDict:
  """``config.generate_data`` for ``kdlab generate-data``: the teacher's ``max_new_tokens``-token replies
  at ``temperature`` to the prompts of ``source`` (seed 0, no top-k / top-p)."""
  return ml_collections.ConfigDict(dict(source=source, max_new_tokens=max_new_tokens, temperature=temperature,
                                        prompt_len=None, top_k=None, top_p=None, seed=0))
