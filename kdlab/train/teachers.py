"""Teachers: resolving ``config.teachers`` entries and loading finished runs' checkpoints into models.

Also the fingerprint of what a teacher-output cache depends on (the teacher's saved parameters and
the training text), and opening the cache a run reads (``config.teacher_cache``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdlab import mesh as meshlib
from kdlab import models
from kdlab.data import teacher_cache
from kdlab.data.teacher_cache import canonical, digest, params_digest, teacher_k, text_digest
from kdlab.errors import UserError
from kdlab.train import checkpoint, tasks
from kdlab.train.step import Teacher


def model_kwargs(cfg: Any, field: str) -> dict[str, Any]:
  kwargs = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = kwargs.get("name")
  if name not in models.names():
    raise UserError(f"{field}.name: unknown model {name!r}; choose one of {', '.join(models.names())}")
  return kwargs


def create_model(kwargs: dict[str, Any], field: str, seed: int) -> nnx.Module:
  kwargs = dict(kwargs)
  try:
    return models.create(kwargs.pop("name"), seed=seed, **kwargs)
  except TypeError as e:
    raise UserError(f"{field}: {e}") from None
  except ValueError as e:
    raise UserError(f"{field}: {e}") from None


def teacher_spec(entry: Any, i: int) -> dict[str, Any]:
  """Resolves ``config.teachers[i]``: its checkpoint and model (from the teacher run's config.json)."""
  field = f"config.teachers[{i}]"
  entry = dict(entry)
  init = entry.get("init")
  if not init:
    raise UserError(f"{field}.init: missing; set it to a finished run's checkpoints/ folder")
  ckpt = pathlib.Path(init)
  if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
    raise UserError(f"{field}.init: no teacher checkpoint at {init!r}; train the teacher first "
                    f"(kdlab train --config=...:teacher --workdir=...) or fix the path")
  run_config = ckpt.parent / "config.json"
  if run_config.exists():
    model = json.loads(run_config.read_text())["model"]
  elif "model" in entry:
    model = entry["model"] if isinstance(entry["model"], dict) else {"name": entry["model"]}
  else:
    raise UserError(f"{field}.model: {init!r} has no config.json beside it; give the teacher's model dict")
  eval_only = entry.get("eval_only", False)
  if not isinstance(eval_only, bool):
    raise UserError(f"{field}.eval_only must be True or False, got {eval_only!r}")
  return {"name": entry.get("name", f"t{i}"), "init": str(ckpt), "model": model_kwargs(model, f"{field}.model"),
          "eval_only": eval_only}


def load_variables(model: nnx.Module, checkpoints: str | pathlib.Path, field: str
                   ) -> tuple[nnx.GraphDef, Any, Any]:
  """``model``'s graph and the ``(params, rest)`` pure dicts of the latest checkpoint in ``checkpoints``.

  The one way kdlab puts a finished run's saved student into a model (teachers, ``kdlab sample``,
  on-policy evaluation). ``field`` names the config field or flag for errors.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  saved_params, saved_rest = checkpoint.load_student_variables(checkpoints, field)
  try:
    loaded = (restore_like(nnx.to_pure_dict(params), saved_params),
              restore_like(nnx.to_pure_dict(rest), saved_rest, strict=False))
  except (KeyError, ValueError):
    raise UserError(f"{field}: the checkpoint in {str(checkpoints)!r} does not match its config.model "
                    f"{type(model).__name__} (different architecture or sizes)") from None
  return graphdef, *loaded


def load_model(kwargs: dict[str, Any], checkpoints: str | pathlib.Path, field: str) -> nnx.Module:
  """The model of ``kwargs`` (``config.model``) with the parameters of the latest checkpoint in ``checkpoints``."""
  graphdef, params, rest = load_variables(create_model(kwargs, field, 0), checkpoints, field)
  return nnx.merge(graphdef, params, rest)


def load_teachers(specs: Sequence[dict[str, Any]], mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = ()
                  ) -> tuple[list[Teacher], list[Any]]:
  """Frozen teachers (resolved by :func:`teacher_spec`) and their variables ``(params, rest)`` on the mesh:
  params placed by ``rules`` (``config.sharding_rules``), the rest replicated."""
  teachers, variables = [], []
  for i, spec in enumerate(specs):
    field = f"config.teachers[{i}]"
    model = create_model(spec["model"], f"{field}.model", 0)
    graphdef, params, rest = load_variables(model, spec["init"], f"{field}.init")
    shardings = meshlib.param_shardings(model, mesh, rules, f"{field}.model")
    variables.append((jax.device_put(params, shardings), jax.device_put(rest, meshlib.replicated(mesh))))
    teachers.append(Teacher(spec["name"], graphdef, tuple(spec.get("taps", ()))))
  return teachers, variables


def restore_like(fresh: Any, saved: Any, strict: bool = True) -> Any:
  """``saved`` values in the structure of ``fresh`` (orbax turns int keys into strings).

  With ``strict=False`` missing entries and PRNG keys keep their fresh values.
  """
  if isinstance(fresh, dict):
    saved = saved if isinstance(saved, dict) else {}
    return {k: restore_like(v, saved.get(k, saved.get(str(k))), strict) for k, v in fresh.items()}
  if saved is None or jnp.issubdtype(fresh.dtype, jax.dtypes.prng_key):
    if strict:
      raise KeyError("missing entry")
    return fresh
  if saved.shape != fresh.shape:
    raise ValueError(f"shape {saved.shape} != {fresh.shape}")
  return jnp.asarray(saved, fresh.dtype)




def train_text(config: Any) -> Any:
  """The packed training split of ``config.data`` (a ``kdlab.data.text.TextSource``), loaded and
  checked as the training loop does."""
  task = tasks.for_source(config.data.source)
  if task is not tasks.LANGUAGE_MODEL:
    raise UserError(f"config.data.source={config.data.source!r}: the teacher cache needs a text source "
                    f"(language modelling), e.g. 'pysrc'")
  return task.load(config.data)[0]


def fingerprint(config: Any, *, dataset: Any = None) -> str:
  """What a teacher cache for ``config`` depends on, as ``"teacher=..;tokenizer=..;data=..;k=.."``.

  * ``teacher``: the teacher's model config (from its run's ``config.json``) and a hash of the
    parameters of the latest checkpoint in ``config.teachers[0].init``;
  * ``tokenizer``: ``config.data.tokenizer`` (default ``byte``) and the teacher's vocab size;
  * ``data``: the source name, split (``train``), ``seq_len`` and a hash of the packed training
    tokens, targets and mask (so ``max_bytes``, the corpus files and the tokenizer's output all
    count; pass ``dataset`` when it is already loaded);
  * ``k``: :func:`teacher_k`.

  The cache-teacher config and the student's config give the same value when they name the same
  teacher checkpoint, data fields and ``k``. Loads the teacher's parameters (host memory).
  """
  if not config.get("teachers"):
    raise UserError("config.teachers: empty; the teacher cache needs the teacher as config.teachers[0] "
                    "(init=a finished run's checkpoints/ folder)")
  spec = teacher_spec(config.teachers[0], 0)
  params, _ = checkpoint.load_student_variables(spec["init"], "config.teachers[0].init")
  model = spec["model"]
  dataset = train_text(config) if dataset is None else dataset
  tokenizer = config.data.get("tokenizer", "byte")
  seq_len = int(getattr(dataset, "records", dataset).tokens.shape[1])
  parts = {
      "teacher": digest(canonical(model), params_digest(params).encode()),
      "tokenizer": f"{tokenizer}-{model.get('vocab_size')}",
      "data": digest(canonical([config.data.source, "train", seq_len]), text_digest(dataset).encode()),
      "k": str(teacher_k(config)),
  }
  return ";".join(f"{name}={value}" for name, value in parts.items())


def open_run_cache(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> Any:
  """``config.teacher_cache``: opens it (checking its fingerprint) and adds its keys to the abstract ``batch``."""
  path = config.get("teacher_cache")
  if not path:
    return None
  cache = teacher_cache.open_cache(path, expected_fingerprint=fingerprint(config))
  index = batch["index"]
  sample = cache.lookup(np.arange(index.shape[0]) % max(len(cache), 1))
  for k, v in sample.items():
    batch[k] = jax.ShapeDtypeStruct((index.shape[0], *v.shape[1:]), v.dtype)
  return cache
