"""``kdlab export``: a finished run's student as a Hugging Face directory that serving stacks load.

The student must be one of the pretrained families (``llama``, ``qwen2``, ``qwen3``, ``gemma3``:
``config.model = dict(name="hf", path=DIR)`` or ``dict(name="llama", ...)``). The checkpoint's
parameters are written by :func:`kdlab.models.save_pretrained` (``config.json``, safetensors split
into shards above ``max_shard_bytes`` with an index) together with the tokenizer files of the
student's source: its own Hugging Face directory, else ``config.data.tokenizer = "hf:DIR"``, else
the first teacher's ``init="hf:DIR"``. Everything is checked before anything is written, and the
output appears only when complete.
"""

from __future__ import annotations

import json
import pathlib
import jax
import ml_collections
from flax import nnx

from kdlab.errors import UserError
from kdlab.models import pretrained
from kdlab.train import checkpoint
from kdlab.train import teachers as teacherlib


def tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
  """The Hugging Face directory whose tokenizer files the exported student carries."""
  path = teacherlib.pretrained_dir(config.model)
  data_tok = config.data.get("tokenizer") or ""
  if path is None and data_tok.startswith(teacherlib.HF_PREFIX):
    path = data_tok[len(teacherlib.HF_PREFIX):]
  for entry in config.get("teachers") or ():
    init = dict(entry).get("init") or ""
    if path is None and init.startswith(teacherlib.HF_PREFIX):
      path = init[len(teacherlib.HF_PREFIX):]
  return path


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
           max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes the student of the run in ``workdir`` (its latest checkpoint, or ``step``) to ``out``."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "config.json").is_file():
    raise UserError(f"--workdir={workdir}: no config.json there; give a kdlab run's directory")
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out={out}: exists and is not an empty folder; choose a new output folder")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  kwargs = teacherlib.model_kwargs(config.model, "config.model")
  kwargs.update(teacherlib.precision_kwargs(config, kwargs, "config"))
  if kwargs["name"] not in pretrained.EXPORT:
    raise UserError(f"--workdir={workdir}: its student is {kwargs['name']!r}; Hugging Face export covers "
                    f"{', '.join(pretrained.EXPORT)} (config.model = dict(name='hf', path=DIR) or dict(name='llama', ...))")
  make = lambda: teacherlib.create_model(kwargs, "config.model", 0)  # noqa: E731
  graphdef, params, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params_like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=device),
                             nnx.to_pure_dict(params))
  # The non-parameter variables are small: built whole (the jit drops the parameters' computation).
  rest = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[2]))()
  params, rest = checkpoint.restore_student(workdir / "checkpoints", params_like, rest, f"--workdir={workdir}",
                                            step=step)
  model = nnx.merge(graphdef, params, rest)
  return pretrained.save_pretrained(model, out, max_shard_bytes=max_shard_bytes,
                                    tokenizer_from=tokenizer_source(config))


def describe(out: pathlib.Path) -> str:
  files = sorted(p.name for p in out.iterdir())
  return f"exported to {out}: {', '.join(files)}"

