"""``kdlab plan``: what a run would hold on each device, before it is run.

Everything is built abstractly: the student's train state and each teacher's parameters as
``jax.ShapeDtypeStruct`` with the shardings the run would give them (``config.mesh``,
``config.sharding_rules``, ``config.teachers[i].sharding_rules`` and ``dtype``); then the train step
is lowered and compiled for the mesh (``--devices=N`` simulated CPU devices when the machine has
fewer) and XLA's memory analysis gives the step's arguments, outputs and temporaries per device.
No parameter is allocated, so an 8B teacher is planned on a laptop. Teachers need no checkpoint:
``config.teachers[i] = dict(model=dict(...))`` is enough.

Per device: ``state`` (the student's parameters, optimizer state and EMA copy), ``teachers`` (their
parameters), ``temp`` (the compiled step's temporaries: activations, gradients, collectives
buffers), and ``peak`` = arguments + outputs - donated aliases + temporaries, compared with
``--device-memory``. Beside the measured state bytes, the analytic count: parameters x bytes per
parameter (+ the optimizer's moments: 2 for Adam-like optimizers, 1 for momentum SGD) divided by
the number of devices that split them.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from kdlab import mesh as meshlib
from kdlab.errors import UserError
from kdlab.train import optim
from kdlab.train import teachers as teacherlib
from kdlab.train.loop import make_jitted_train_step
from kdlab.train.prepare import prepare
from kdlab.train.state import state_layout
from kdlab.train.step import Teacher

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, field: str = "--device-memory") -> int:
  """``"80GiB"``, ``"16 GB"``, ``"123456"`` -> bytes."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise UserError(f"{field}={text!r}: not an amount of memory; write e.g. 80GiB, 16GB or 96e9")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _moments(tx_name: str) -> int:
  """Per-parameter optimizer moments of optax's ``tx_name`` (for the analytic count)."""
  if tx_name in ("sgd",):
    return 1
  if tx_name in ("adafactor", "lion", "sm3"):
    return 1
  return 2


def plan(config: ml_collections.ConfigDict, *, device_memory: int | None = None) -> dict[str, Any]:
  """The per-device memory of a run of ``config`` on this process's devices (see the module docstring)."""
  setup = prepare(config, need_weights=False)
  mesh = setup.mesh
  tx = optim.make(config.optimizer, setup.steps_per_epoch, setup.total_steps)
  term_states = jax.eval_shape(setup.objective.init_state)
  graphdef, state, state_sharding, _ = state_layout(
      setup.make_learner, tx, term_states, config.seed, ema=setup.ema_decay is not None, mesh=mesh,
      param_shardings=setup.param_shardings)
  rules = config.get("sharding_rules") or ()
  teachers, teacher_vars, teacher_rows = [], [], []
  for i in setup.objective_teachers:
    spec = setup.teacher_specs[i]
    t_graphdef, params, rest, _ = teacherlib.teacher_layout(spec, i, mesh, rules)
    teachers.append(Teacher(spec["name"], t_graphdef, tuple(spec.get("taps", ())), spec.get("vocab"),
                            spec.get("input_key")))
    teacher_vars.append((params, rest))
    teacher_rows.append({"name": spec["name"], "model": spec["model"]["name"], "parameters": _count(params),
                         "dtype": str(jax.tree.leaves(params)[0].dtype),
                         "params_bytes": meshlib.bytes_per_device(params)})
  batch_sharding = meshlib.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in setup.task.abstract_batch(setup.train_source, config.data.batch_size).items()}
  step = make_jitted_train_step(setup, graphdef, tx, teachers, teacher_vars, state_sharding)
  t0 = time.time()
  compiled = step.lower(state, teacher_vars, batch).compile()
  compile_s = time.time() - t0
  memory = compiled.memory_analysis()

  devices = mesh.size
  n_student = _count(state.params["student"])
  n_learner = _count(state.params)
  param_bytes = np.dtype(jax.tree.leaves(state.params)[0].dtype).itemsize
  moments = _moments(config.optimizer.get("name", "sgd"))
  split = lambda sharding_axes: math.prod(mesh.shape[a] for a in sharding_axes)  # noqa: E731
  param_split = split(a for a in ("fsdp", "model") if a in mesh.shape)
  analytic_state = n_learner * param_bytes * (1 + moments + (1 if state.ema else 0)) / param_split
  analytic_teachers = sum(r["parameters"] * np.dtype(r["dtype"]).itemsize for r in teacher_rows) / param_split
  state_bytes = {"params": meshlib.bytes_per_device(state.params),
                 "opt_state": meshlib.bytes_per_device(state.opt_state),
                 "ema": meshlib.bytes_per_device(state.ema)}
  compiled_bytes = {"arguments": int(memory.argument_size_in_bytes), "outputs": int(memory.output_size_in_bytes),
                    "aliased": int(memory.alias_size_in_bytes), "temp": int(memory.temp_size_in_bytes)}
  peak = compiled_bytes["arguments"] + compiled_bytes["outputs"] - compiled_bytes["aliased"] + compiled_bytes["temp"]
  return {
      "devices": devices, "platform": jax.devices()[0].platform, "mesh": dict(mesh.shape),
      "student": {"model": setup.student_kwargs["name"], "parameters": n_student, "learner_parameters": n_learner,
                  "param_dtype": str(jax.tree.leaves(state.params)[0].dtype), "optimizer": config.optimizer.get("name", "sgd"),
                  "bytes": state_bytes, "state_bytes": sum(state_bytes.values()),
                  "analytic_state_bytes": analytic_state},
      "teachers": teacher_rows,
      "teacher_bytes": sum(r["params_bytes"] for r in teacher_rows),
      "analytic_teacher_bytes": analytic_teachers,
      "batch": {k: list(v.shape) for k, v in batch.items()},
      "compiled": compiled_bytes, "peak_bytes": peak, "compile_s": compile_s,
      "device_memory": device_memory, "fits": None if device_memory is None else peak <= device_memory,
  }


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  return f"{n / 2**30:8.3f} GiB" if n >= 2**30 else f"{n / 2**20:8.3f} MiB"


def format_plan(p: dict[str, Any]) -> str:
  """The plan as the table ``kdlab plan`` prints."""
  s = p["student"]
  lines = [f"kdlab plan: {p['devices']} {p['platform']} devices, mesh {p['mesh']} "
           f"(step compiled in {p['compile_s']:.1f} s)",
           f"student {s['model']}: {s['parameters']:,} parameters ({s['param_dtype']}), "
           f"+{s['learner_parameters'] - s['parameters']:,} in connectors, optimizer {s['optimizer']}"]
  for t in p["teachers"]:
    lines.append(f"teacher {t['name']} ({t['model']}): {t['parameters']:,} parameters ({t['dtype']})")
  lines += ["", "per device                          measured      analytic",
            f"  student params                {_gib(s['bytes']['params'])}",
            f"  student optimizer state       {_gib(s['bytes']['opt_state'])}",
            f"  student EMA copy              {_gib(s['bytes']['ema'])}",
            f"  student state (sum)           {_gib(s['state_bytes'])}  {_gib(s['analytic_state_bytes'])}"
            f"  ({100 * (s['state_bytes'] / s['analytic_state_bytes'] - 1):+.2f}%)",
            f"  teacher params                {_gib(p['teacher_bytes'])}  {_gib(p['analytic_teacher_bytes'])}"
            + (f"  ({100 * (p['teacher_bytes'] / p['analytic_teacher_bytes'] - 1):+.2f}%)"
               if p["analytic_teacher_bytes"] else ""),
            "compiled train step (XLA memory analysis, per device)",
            f"  arguments                     {_gib(p['compiled']['arguments'])}",
            f"  outputs                       {_gib(p['compiled']['outputs'])}",
            f"  donated (aliased)             {_gib(p['compiled']['aliased'])}",
            f"  temporaries                   {_gib(p['compiled']['temp'])}",
            f"  peak                          {_gib(p['peak_bytes'])}"]
  if p["device_memory"] is not None:
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"device memory {_gib(p['device_memory']).strip()}: {verdict} "
                 f"({100 * p['peak_bytes'] / p['device_memory']:.1f}% used)")
  return "\n".join(lines)

