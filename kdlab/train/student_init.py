"""Where the student's first parameters come from.

* random, from ``config.seed`` (the default);
* a Hugging Face directory: ``config.model = dict(name="hf", path=DIR)`` (llama, qwen2, qwen3,
  gemma3), each device reading only its slices of the safetensors files;
* its teacher's layers: ``config.init_from_teacher = dict(layers=[0, 2, 4, ...], teacher=0)``: the
  student's block ``j`` starts as the teacher's block ``layers[j]``, and everything outside the
  blocks (embeddings, final norm, unembedding) is the teacher's (DistilBERT's initialization).
  The student must have the teacher's widths and ``len(layers)`` blocks.

Only a fresh run is initialized so; a resumed run restores its checkpoint. The optimizer's moments
start at zero and the EMA copy (``config.ema_teacher``) at the loaded parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdlab.errors import UserError
from kdlab.train import teachers as teacherlib
from kdlab.train.state import TrainState

FIELD = "config.init_from_teacher"


def describe(config: Any, teacher_specs: Sequence[dict[str, Any]], student: nnx.Module,
             teachers: Sequence[nnx.Module]) -> dict[str, Any] | None:
  """Checks how the student starts (models may be abstract) and returns ``{"hf": DIR}``,
  ``{"teacher": i, "layers": [...]}`` or None (random)."""
  path = teacherlib.pretrained_dir(config.model)
  spec = config.get("init_from_teacher")
  if spec is not None and path is not None:
    raise UserError(f"{FIELD}: config.model already starts from {path!r}; use one of the two")
  if path is not None:
    return {"hf": path}
  if spec is None:
    return None
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  unknown = set(spec) - {"layers", "teacher"}
  if unknown:
    raise UserError(f"{FIELD}: unknown field(s) {sorted(unknown)}; give dict(layers=[...], teacher=0)")
  index = spec.get("teacher", 0)
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(teachers):
    raise UserError(f"{FIELD}.teacher={index!r}: no such teacher; config.teachers has {len(teachers)}")
  s_params, t_params = _params(student), _params(teachers[index])
  s_key, t_key = _blocks_key(s_params), _blocks_key(t_params)
  layers = spec.get("layers")
  if s_key is None or t_key is None or s_key != t_key:
    raise UserError(f"{FIELD}: the student and config.teachers[{index}] are not decoders of one family "
                    f"(their blocks differ); initialize from a teacher of the student's architecture")
  count = len(t_params[t_key])
  if (not isinstance(layers, (list, tuple)) or not layers
      or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < count for l in layers)):
    raise UserError(f"{FIELD}.layers={layers!r}: give the teacher layers to copy, indices in 0..{count - 1}")
  if len(layers) != len(s_params[s_key]):
    raise UserError(f"{FIELD}.layers: {len(layers)} layers for a student of {len(s_params[s_key])}; give one "
                    f"teacher layer per student layer")
  mapped = _select(t_params, t_key, layers)
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
  if jax.tree.structure(mapped) != jax.tree.structure(s_params) or shapes(mapped) != shapes(s_params):
    raise UserError(f"{FIELD}: the student's parameters differ in shape from config.teachers[{index}]'s; give "
                    f"the student the teacher's widths (hidden size, heads, MLP, vocabulary) and fewer layers")
  return {"teacher": index, "layers": list(layers)}


def apply(how: dict[str, Any] | None, state: TrainState, student: nnx.Module, shardings: Any,
          teacher_variables: Sequence[Any]) -> TrainState:
  """``state`` with the student's parameters (and EMA copy) set as ``how`` (:func:`describe`) says.

  ``student`` is the (abstract) student model, ``shardings`` the student's parameter shardings,
  ``teacher_variables`` every teacher's ``(params, rest)`` in ``config.teachers`` order.
  """
  if how is None:
    return state
  like = state.params["student"]
  if "hf" in how:
    loaded = teacherlib.pretrained_params(how["hf"], student, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings))
  else:
    params = teacher_variables[how["teacher"]][0]
    loaded = _select(params, _blocks_key(params), how["layers"])
    # New buffers: the state is donated to the step, the teacher's arrays must survive it.
    loaded = jax.device_put(jax.tree.map(lambda x, ref: jnp.array(x, ref.dtype, copy=True), loaded, like), shardings)
  loaded = teacherlib.restore_like(like, loaded)
  params = {**state.params, "student": loaded}
  ema = {**state.ema, "student": jax.tree.map(jnp.copy, loaded)} if state.ema else state.ema
  return dataclasses.replace(state, params=params, ema=ema)


def _params(model: nnx.Module) -> dict[Any, Any]:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _blocks_key(params: dict[Any, Any]) -> Any:
  """The key of the per-layer list (``blocks`` of gpt, ``layers`` of the pretrained families)."""
  for key, value in params.items():
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
      return key
  return None


def _select(params: dict[Any, Any], key: Any, layers: Sequence[int]) -> dict[Any, Any]:
  return {**params, key: {j: params[key][layer] for j, layer in enumerate(layers)}}
