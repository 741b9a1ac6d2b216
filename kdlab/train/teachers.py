"""Teachers: resolving ``config.teachers`` entries and loading finished runs' checkpoints into models.

Also the fingerprint of what a teacher-output cache depends on (the teacher's saved parameters and
the training text), and opening the cache a run reads (``config.teacher_cache``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdlab import mesh as meshlib
from kdlab import models
from kdlab.config import one_line, show
from kdlab.data import teacher_cache
from kdlab.data.teacher_cache import canonical, digest, params_digest, teacher_k, text_digest
from kdlab.errors import UserError
from kdlab.train import checkpoint, tasks
from kdlab.train.step import Teacher


HF_PREFIX = "hf:"


def model_kwargs(cfg: Any, field: str) -> dict[str, Any]:
  """A ``config.model``-style dict as ``create`` keyword arguments (with ``name``).

  ``dict(name="hf", path=DIR, **overrides)`` is the Hugging Face directory ``DIR``'s architecture
  (``config.json``: llama, qwen2, qwen3, gemma3), with ``overrides`` (e.g. ``max_len``, ``remat``)
  on top; its weights are loaded by :func:`pretrained_dir`'s callers.
  """
  kwargs = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = kwargs.get("name")
  if name == "hf":
    from kdlab.models import pretrained
    path = hf_dir(kwargs.pop("path", None), f"{field}.path")
    hf = pretrained.read_hf_config(path)
    where = f"{path}/config.json"
    kwargs.pop("name")
    return {"name": pretrained.hf_family(hf, where), **pretrained.hf_kwargs(hf, where), **kwargs}
  if name not in models.names():
    raise UserError(f"{field}.name: unknown model {name!r}; choose one of hf, {', '.join(models.names())}")
  return kwargs


def hf_dir(path: Any, field: str) -> str:
  """``path`` checked to be a Hugging Face model directory (a folder with ``config.json``)."""
  if not isinstance(path, str) or not path:
    raise UserError(f"{field}: missing; give the local Hugging Face directory (config.json, *.safetensors)")
  if not (pathlib.Path(path) / "config.json").is_file():
    raise UserError(f"{field}={path!r}: no config.json there; give a local Hugging Face model directory "
                    f"(download it first: nothing is fetched at run time)")
  return path


def pretrained_dir(cfg: Any) -> str | None:
  """The Hugging Face directory a ``config.model``-style dict starts from (``name="hf"``), else None."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  return cfg.get("path") if cfg.get("name") == "hf" else None


def create_model(kwargs: dict[str, Any], field: str, seed: int) -> nnx.Module:
  kwargs = dict(kwargs)
  try:
    return models.create(kwargs.pop("name"), seed=seed, **kwargs)
  except TypeError as e:
    raise UserError(f"{field}: {e}") from None
  except ValueError as e:
    raise UserError(f"{field}: {e}") from None


def teacher_spec(entry: Any, i: int, *, need_weights: bool = True) -> dict[str, Any]:
  """Resolves ``config.teachers[i]``: its checkpoint and model (from the teacher run's config.json).

  The checkpoint must come from a finished run (``summary.json`` beside ``checkpoints/``, see
  :func:`check_finished`) unless the entry says ``allow_unfinished=True``; Hugging Face teachers
  (``init="hf:DIR"``) are pretrained. With ``need_weights=False`` (``kdlab plan``) a teacher whose
  checkpoint does not exist yet is resolved from its ``model`` dict alone.
  """
  field = f"config.teachers[{i}]"
  entry = dict(entry)
  init = entry.get("init")
  allow_unfinished = entry.get("allow_unfinished", False)
  if not isinstance(allow_unfinished, bool):
    raise UserError(f"{field}.allow_unfinished={show(allow_unfinished)}: use True or False")
  if isinstance(init, str) and init.startswith(HF_PREFIX):  # a pretrained Hugging Face teacher
    path = hf_dir(init[len(HF_PREFIX):], f"{field}.init")
    entry["model"] = {**dict(entry.get("model") or {}), "name": "hf", "path": path}
    return _spec(entry, i, init, entry["model"])
  if not init and (need_weights or "model" not in entry):
    raise UserError(f"{field}.init: missing; set it to a finished run's checkpoints/ folder")
  ckpt = pathlib.Path(init or "")
  exists = bool(init) and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
  if not exists and not (need_weights is False and "model" in entry):
    raise UserError(f"{field}.init: no teacher checkpoint at {init!r}; train the teacher first "
                    f"(kdlab train --config=...:teacher --workdir=...) or fix the path")
  if exists and need_weights and not allow_unfinished:
    check_finished(ckpt, field)
  run_config = ckpt.parent / "config.json"
  if exists and run_config.exists():
    model = json.loads(run_config.read_text())["model"]
  elif "model" in entry:
    model = entry["model"] if isinstance(entry["model"], dict) else {"name": entry["model"]}
  else:
    raise UserError(f"{field}.model: {init!r} has no config.json beside it; give the teacher's model dict")
  return _spec(entry, i, str(ckpt), model)


def check_finished(checkpoints: pathlib.Path, field: str) -> None:
  """The run ``checkpoints`` belongs to has finished: its folder holds a readable ``summary.json``.

  A run interrupted (or still training) has checkpoints but no summary; distilling from it would
  use a half-trained teacher without a word. ``field`` is ``config.teachers[i]``.
  """
  run = checkpoints.parent
  try:
    json.loads((run / "summary.json").read_text())
    return
  except FileNotFoundError:
    why = f"no summary.json in {run}"
  except (OSError, ValueError):
    why = f"{run / 'summary.json'} is unreadable"
  raise UserError(f"{field}.init: {str(checkpoints)!r} is not from a finished run ({why}); finish the teacher "
                  f"(rerun its kdlab train command), or set --{field}.allow_unfinished=True to distil from its "
                  f"latest checkpoint")


def _spec(entry: dict[str, Any], i: int, init: str, model: Any) -> dict[str, Any]:
  field = f"config.teachers[{i}]"
  eval_only = entry.get("eval_only", False)
  if not isinstance(eval_only, bool):
    raise UserError(f"{field}.eval_only must be True or False, got {show(eval_only)}")
  rules = entry.get("sharding_rules")
  if rules is not None and not isinstance(rules, (list, tuple)):
    raise UserError(f"{field}.sharding_rules: {show(rules)} is not a list of (logical name, mesh axis) pairs; "
                    f"e.g. [('embed', 'fsdp'), ('mlp', 'model')], or leave it out to use config.sharding_rules")
  kwargs = model_kwargs(model, f"{field}.model")
  kwargs.update(precision_kwargs({"dtype": entry.get("dtype"), "param_dtype": entry.get("dtype")}, kwargs, field))
  return {"name": entry.get("name", f"t{i}"), "init": init, "model": kwargs, "eval_only": eval_only,
          "sharding_rules": None if rules is None else [tuple(r) if isinstance(r, list) else r for r in rules]}


DTYPES = ("float32", "bfloat16", "float16")


def precision_kwargs(cfg: Any, kwargs: dict[str, Any], field: str) -> dict[str, str]:
  """``cfg.dtype`` (compute) and ``cfg.param_dtype`` (stored parameters) as model keyword arguments.

  Unset fields give nothing (the model's float32 default); ``field`` names ``cfg`` in errors.
  """
  out = {}
  for name in ("dtype", "param_dtype"):
    value = cfg.get(name)
    if value is None:
      continue
    if value not in DTYPES:
      raise UserError(f"{field}.{name}={show(value)}: use one of {', '.join(DTYPES)}")
    if name not in models.options(kwargs["name"]):
      raise UserError(f"{field}.{name}: model {kwargs['name']!r} has no {name} option; remove {field}.{name} "
                      f"or use a model that has it (gpt, llama, qwen2, qwen3, gemma3)")
    out[name] = value
  return out


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


def teacher_layout(spec: dict[str, Any], i: int, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]
                   ) -> tuple[nnx.GraphDef, Any, Any, Callable[[], nnx.Module]]:
  """Where teacher ``i`` (resolved by :func:`teacher_spec`) lives: its graph, its params as
  ``jax.ShapeDtypeStruct`` with their shardings (its own ``sharding_rules``, else ``rules``) and dtype,
  its other variables (abstract) and a function building the model. Nothing is allocated."""
  field = f"config.teachers[{i}]"
  make = lambda: create_model(spec["model"], f"{field}.model", 0)  # noqa: E731
  abstract = nnx.eval_shape(make)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  own = spec.get("sharding_rules")
  shardings = meshlib.param_shardings(abstract, mesh, rules if own is None else own, f"{field}.model",
                                      "config.sharding_rules" if own is None else f"{field}.sharding_rules")
  params_like = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                             nnx.to_pure_dict(params), shardings)
  rep = meshlib.replicated(mesh)
  rest_like = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=rep), nnx.to_pure_dict(rest))
  return graphdef, params_like, rest_like, make


def load_teachers(specs: Sequence[dict[str, Any]], mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = ()
                  ) -> tuple[list[Teacher], list[Any]]:
  """Frozen teachers (resolved by :func:`teacher_spec`) and their variables ``(params, rest)`` on the mesh.

  Each teacher's params are read from its checkpoint straight into their shardings and dtype
  (:func:`teacher_layout`): no device or host holds a whole copy. The rest (batch statistics,
  RNG streams) is replicated.
  """
  teachers, variables = [], []
  for i, spec in enumerate(specs):
    graphdef, params_like, _, make = teacher_layout(spec, i, mesh, rules)
    # The non-parameter variables are small: built whole (the jit drops the parameters' computation).
    rest = jax.jit(lambda make=make: nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[2]),
                   out_shardings=meshlib.replicated(mesh))()
    if spec["init"].startswith(HF_PREFIX):
      params = pretrained_params(spec["init"][len(HF_PREFIX):], nnx.eval_shape(make), params_like)
      variables.append((params, rest))
    else:
      variables.append(_restore_teacher(spec["init"], params_like, rest, f"config.teachers[{i}].init"))
    teachers.append(Teacher(spec["name"], graphdef, tuple(spec.get("taps", ())), spec.get("vocab"),
                            spec.get("input_key")))
  return teachers, variables


def _restore_teacher(init: str, params_like: Any, rest: Any, field: str) -> tuple[Any, Any]:
  """:func:`kdlab.train.checkpoint.restore_student`, with a checkpoint that cannot be read (truncated or
  garbled files) refused by one line naming ``field``."""
  try:
    return checkpoint.restore_student(init, params_like, rest, field)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (orbax and TensorStore raise many kinds; any of them means damage)
    detail = one_line(str(e)).split(" See full TensorStore details")[0][:200] or type(e).__name__
    raise UserError(f"{field}: the latest checkpoint in {init!r} cannot be read ({detail}); it is damaged: "
                    f"retrain the teacher, or point {field} at a run whose checkpoint loads") from None


def pretrained_params(path: str, model: nnx.Module, params_like: Any) -> Any:
  """The weights of the Hugging Face directory ``path`` for ``model`` (abstract is enough), laid out as
  ``params_like`` says (``jax.ShapeDtypeStruct`` with shardings): each device reads only its slices."""
  from kdlab.models import pretrained
  return pretrained.load_params(path, model, jax.tree.map(lambda p: p.sharding, params_like))


def common_vocab(config: Any, specs: Sequence[dict[str, Any]], student_out: Any, teacher_outs: Sequence[Any]
                 ) -> int | None:
  """The number of logit columns teachers and student are compared over when their vocabularies differ
  only by padding (one tokenizer, embeddings of different sizes, e.g. Qwen2.5 152,064 vs 151,936
  rows); None when every teacher has the student's vocabulary size.

  The student's tokenizer is ``config.data.tokenizer`` (``hf:DIR``) or its Hugging Face directory's;
  each teacher's, its ``init="hf:DIR"`` directory's. Where both are known they must be the same
  tokenizer (else a ``UserError`` naming the cross-tokenizer option), whatever the sizes; sizes that
  differ without known tokenizers are left to the task's check.
  """
  if student_out.logits.ndim != 3:
    return None
  from kdlab.data import hf_tokenizer
  data_tok = config.data.get("tokenizer") or ""
  student_dir = data_tok[len(HF_PREFIX):] if data_tok.startswith(HF_PREFIX) else pretrained_dir(config.model)
  has_tokenizer = lambda d: d is not None and (pathlib.Path(d) / "tokenizer.json").is_file()  # noqa: E731
  vocab = int(student_out.logits.shape[-1])
  common, differs = vocab, False
  for i, (spec, out) in enumerate(zip(specs, teacher_outs)):
    size = int(out.logits.shape[-1])
    teacher_dir = spec["init"][len(HF_PREFIX):] if spec["init"].startswith(HF_PREFIX) else None
    if not (has_tokenizer(student_dir) and has_tokenizer(teacher_dir)):
      if size != vocab:
        return None
      continue
    common = min(common, hf_tokenizer.align_vocab(size, vocab, hf_tokenizer.HFTokenizer.from_dir(teacher_dir),
                                                  hf_tokenizer.HFTokenizer.from_dir(student_dir),
                                                  f"config.teachers[{i}]"))
    differs = differs or size != vocab
  return common if differs else None


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


def teacher_digest(spec: dict[str, Any]) -> str:
  """A hash of a resolved teacher's model config and weights: a run's latest checkpoint (its
  parameters), or a Hugging Face directory's ``config.json`` and ``*.safetensors`` files (their bytes)."""
  init = spec["init"]
  if init.startswith(HF_PREFIX):
    h = hashlib.sha256()
    for path in sorted(pathlib.Path(init[len(HF_PREFIX):]).iterdir()):
      if path.name == "config.json" or path.name.endswith(".safetensors"):
        h.update(path.name.encode())
        with open(path, "rb") as f:
          for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return digest(canonical(spec["model"]), h.hexdigest().encode())
  params, _ = checkpoint.load_student_variables(init, "config.teachers[0].init")
  return digest(canonical(spec["model"]), params_digest(params).encode())


def fingerprint(config: Any, *, dataset: Any = None) -> str:
  """What a teacher cache for ``config`` depends on, as ``"teacher=..;tokenizer=..;data=..;k=.."``.

  * ``teacher``: :func:`teacher_digest` of ``config.teachers[0]`` (a run's checkpoint or an
    ``hf:DIR`` directory);
  * ``tokenizer``: ``config.data.tokenizer`` (default ``byte``) and the teacher's vocab size;
  * ``data``: the source name, split (``train``), ``seq_len`` and a hash of the packed training
    tokens, targets and mask (so ``max_bytes``, the corpus files and the tokenizer's output all
    count; pass ``dataset`` when it is already loaded);
  * ``k``: :func:`teacher_k`.

  The cache-teacher config and the student's config give the same value when they name the same
  teacher, data fields and ``k``. A config with ``config.data.teacher_tokenizer`` (a teacher on its own
  tokens) is refused: the cache is of the teacher on the student's tokens. Reads the teacher's weights
  (a checkpoint's parameters into host memory, or an ``hf:DIR``'s files).
  """
  if config.data.get("teacher_tokenizer"):
    raise UserError(f"config.data.teacher_tokenizer={config.data.teacher_tokenizer!r}: a teacher cache holds the "
                    f"teacher's outputs on the student's tokens, one tokenizer; unset it to cache a teacher of the "
                    f"student's tokenizer, or distil live with the uld / aligned_kd terms")
  if not config.get("teachers"):
    raise UserError("config.teachers: empty; the teacher cache needs the teacher as config.teachers[0] "
                    "(init=a finished run's checkpoints/ folder)")
  spec = teacher_spec(config.teachers[0], 0)
  model = spec["model"]
  dataset = train_text(config) if dataset is None else dataset
  tokenizer = config.data.get("tokenizer", "byte")
  seq_len = int(getattr(dataset, "records", dataset).tokens.shape[1])
  parts = {
      "teacher": teacher_digest(spec),
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
