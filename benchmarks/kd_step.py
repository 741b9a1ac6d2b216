"""One KD training step of the CRD benchmark pair, kdlab vs PyTorch eager, side by side.

  .venv/bin/python benchmarks/kd_step.py --torch-python /tmp/torchbench/bin/python

resnet32x4 teacher (eval mode, no gradient) -> resnet8x4 student (train mode), batch 64 of
32x32x3, SGD (lr 0.05, momentum 0.9, weight decay 5e-4), loss = 0.1 CE + 0.9 KD at T = 4: the
step of RepDistiller's KD recipe. Three steps on each side:

  kd       the whole KD step (teacher forward, student forward + backward, optimizer update)
  student  the student's step alone (loss = CE, no teacher)
  teacher  the teacher's forward alone

kdlab's steps are the code a training run executes: the objective from ``kdlab.objective.build``
on a ``config.objective`` list, the optimizer from ``kdlab.train.optim.make`` on a
``config.optimizer`` dict, ``kdlab.train.state.init_state`` and ``kdlab.train.step.make_train_step``,
jitted with the state donated as ``kdlab.train.loop`` does. The teacher forward is
``kdlab.train.step.run_teachers`` under ``jax.jit``. Only the data pipeline and the checkpointed
teacher are replaced, by one fixed random batch and a freshly initialised teacher (timing does
not depend on the values).

Each side runs in its own worker process: kdlab's is this file with ``--worker`` (its own
``XLA_FLAGS`` and ``KDLAB_CONV_IMPL``), PyTorch's is benchmarks/torch_kd_step.py ``--serve``
under ``--torch-python``, since torch lives in its own venv. Both use 2 threads
(``torch.set_num_threads(2)``; XLA uses the machine's cores, 2 here). After warm-up the workers
take turns, ``--iters`` steps per turn for ``--rounds`` rounds, so a change in the machine's load
hits all of them alike; the table gives medians over all timed steps.

  --conv-impl xla,auto,matmul      one kdlab worker per convolution implementation (kdlab/ops/conv.py)
  --variant 'LABEL|XLA_FLAGS=...'  one more kdlab worker with these environment variables
                                   (KD_STEP_DONATE=0: without donating the train state)

Without either, one kdlab worker runs with the environment as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdlab import models, objective as objectives
from kdlab.ops import conv as conv_ops
from kdlab.repro import cpu_name
from kdlab.train import optim
from kdlab.train.state import Learner, init_state
from kdlab.train.step import Teacher, make_train_step, run_teachers
from workers import Worker, serve as serve_requests, timed

HERE = pathlib.Path(__file__).resolve().parent
TEACHER, STUDENT, NUM_CLASSES = "resnet32x4", "resnet8x4", 100
DONATE_VAR = "KD_STEP_DONATE"  # "0" in a --variant's environment: that kdlab worker does not donate the state.
TEACHER_FORWARD_GFLOP, STUDENT_STEP_GFLOP = 138.6, 67.9  # PyTorch's flop counter (docs/measured.md).


def config(kind: str) -> ml_collections.ConfigDict:
  """The parts of a CRD-recipe config that the step depends on (``kind``: "kd" or "student")."""
  c = ml_collections.ConfigDict()
  c.objective = ([dict(loss="ce", weight=0.1), dict(loss="kd", weight=0.9, temperature=4.0)] if kind == "kd"
                 else [dict(loss="ce", weight=1.0)])
  c.optimizer = dict(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                     schedule="piecewise", warmup_epochs=0.0, boundaries_epochs=[150, 180, 210], decay=0.1)
  c.train_examples, c.epochs = 50_000, 240
  return c


class KdlabBench:
  """kdlab's three steps, compiled, with their state; ``run(op)`` performs one step of ``op``."""

  def __init__(self, batch_size: int, conv_impl: str, donate: bool = True):
    self.conv_impl = conv_impl
    with conv_ops.use_impl(conv_impl):  # Models built here use this convolution.
      student = models.create(STUDENT, num_classes=NUM_CLASSES, seed=0)
      teacher = models.create(TEACHER, num_classes=NUM_CLASSES, seed=1)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    self.teacher_vars = [(nnx.to_pure_dict(t_params), nnx.to_pure_dict(t_rest))]
    teachers = [Teacher("t0", t_graphdef)]
    rng = np.random.default_rng(0)
    self.batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
                  "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size), jnp.int32),
                  "index": jnp.arange(batch_size, dtype=jnp.int32),
                  "mask": jnp.ones(batch_size, bool)}
    x = jax.ShapeDtypeStruct(self.batch["image"].shape, jnp.float32)

    def out_shapes(model: nnx.Module) -> objectives.ModelOutput:
      return jax.eval_shape(lambda m, x: objectives.ModelOutput(*m(x, train=False)), model, x)

    s_out, t_out = out_shapes(student), out_shapes(teacher)
    self.steps: dict[str, tuple[Callable, Any, list]] = {}
    for kind in ("kd", "student"):
      cfg = config(kind)
      kd = kind == "kd"
      shapes = objectives.Shapes(s_out, [t_out] if kd else [], ["t0"] if kd else [], cfg.train_examples)
      objective = objectives.build(cfg.objective, shapes, nnx.Rngs(1))
      steps_per_epoch = cfg.train_examples // batch_size
      tx = optim.make(cfg.optimizer, steps_per_epoch, cfg.epochs * steps_per_epoch)
      learner = Learner(student, objective.connectors())
      graphdef, state = init_state(learner, tx, objective.init_state(), seed=0)
      state = jax.tree.map(jnp.copy, state)  # Own buffers: the step donates them.
      step = jax.jit(make_train_step(graphdef, objective, tx, teachers if kd else []),
                     donate_argnums=(0,) if donate else ())
      self.steps[kind] = (step, state, self.teacher_vars if kd else [])
    self.teacher_forward = jax.jit(lambda v, x: run_teachers(teachers, v, x)[0].logits)

  def run(self, op: str) -> None:
    if op == "teacher":
      jax.block_until_ready(self.teacher_forward(self.teacher_vars, self.batch["image"]))
      return
    step, state, teacher_vars = self.steps[op]
    state, metrics = step(state, teacher_vars, self.batch)
    jax.block_until_ready((state, metrics))
    self.steps[op] = (step, state, teacher_vars)

  def times(self, op: str, n: int, warmup: int = 0) -> list[float]:
    return timed(lambda: self.run(op), n, warmup)


def serve(bench: Any, info: dict) -> None:
  """The worker loop (benchmarks/workers.py): ``info``, or the times of ``n`` steps of an op."""
  serve_requests(lambda req: info if req["op"] == "info" else
                 {"times": bench.times(req["op"], int(req.get("n", 1)), int(req.get("warmup", 0)))})


OPS = ("kd", "student", "teacher")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
  """``"LABEL|VAR=VALUE|VAR=VALUE"`` -> ``(LABEL, {VAR: VALUE})``."""
  label, *assignments = text.split("|")
  env = {}
  for a in assignments:
    var, sep, value = a.partition("=")
    if not sep:
      raise SystemExit(f"--variant {text!r}: {a!r} is not VAR=VALUE")
    env[var] = value
  return label, env


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-python", default=None,
                      help="interpreter with torch installed (e.g. /tmp/torchbench/bin/python); omit to time kdlab only")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--iters", type=int, default=3, help="timed steps per turn")
  parser.add_argument("--rounds", type=int, default=3, help="turns per side and step")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
  parser.add_argument("--conv-impl", default=None,
                      help="comma-separated kdlab conv impls to time, one kdlab worker each (xla, matmul, auto)")
  parser.add_argument("--variant", action="append", default=[], metavar="LABEL|VAR=VALUE|...",
                      help="an extra kdlab worker with these environment variables (e.g. XLA_FLAGS=...)")
  parser.add_argument("--torch-channels-last", action="store_true")
  parser.add_argument("--peak-gflops", type=float, default=134.0, help="machine fp32 matmul peak (docs/measured.md)")
  parser.add_argument("--json", default=None, help="also write the raw times here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    donate = os.environ.get(DONATE_VAR, "1") != "0"
    bench = KdlabBench(args.batch_size, conv_ops.default_impl(), donate=donate)
    serve(bench, {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "?",
                  "conv_impl": bench.conv_impl, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "donate": donate, "backend": jax.default_backend(), "devices": jax.device_count()})
    return

  kdlab_cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
               "--batch-size", str(args.batch_size)]
  variants = []
  if args.conv_impl:
    variants += [(f"kdlab ({impl} conv)", {conv_ops.ENV_VAR: impl}) for impl in args.conv_impl.split(",")]
  variants += [parse_variant(v) for v in args.variant]
  if not variants:
    variants = [(f"kdlab ({conv_ops.default_impl()} conv, default)", {})]
  sides: dict[str, Worker] = {label: Worker(kdlab_cmd, env) for label, env in variants}
  if args.torch_python:
    sides["PyTorch eager"] = Worker([args.torch_python, str(HERE / "torch_kd_step.py"), "--serve",
                                     "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
                                    + (["--channels-last"] if args.torch_channels_last else []))
  infos = {name: side.request(op="info") for name, side in sides.items()}
  for side in sides.values():  # Compiles kdlab's steps; warms PyTorch's allocator and oneDNN caches.
    for op in OPS:
      side.times(op, 0, args.warmup)
  times: dict[str, dict[str, list[float]]] = {name: {op: [] for op in OPS} for name in sides}
  loads = [os.getloadavg()[0]]  # This benchmark itself adds about 2 (its two busy threads).
  for _ in range(args.rounds):
    for op in OPS:
      for name, side in sides.items():
        times[name][op] += side.times(op, args.iters)
    loads.append(os.getloadavg()[0])
  for side in sides.values():
    side.close()

  med = {name: {op: statistics.median(ts) for op, ts in by_op.items()} for name, by_op in times.items()}
  floor = (TEACHER_FORWARD_GFLOP + STUDENT_STEP_GFLOP) / args.peak_gflops
  print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_name()}); 1-minute load average "
        f"{loads[0]:.2f} at the start, {min(loads[1:]):.2f}-{max(loads[1:]):.2f} during the timed rounds")
  for name, info in infos.items():
    print(f"{name}: {json.dumps(info)}")
  print(f"batch {args.batch_size}; medians of {args.rounds} rounds x {args.iters} steps per cell; floor "
        f"{floor:.2f} s = {TEACHER_FORWARD_GFLOP + STUDENT_STEP_GFLOP:.1f} GFLOP at {args.peak_gflops:.0f} GFLOP/s")
  print()
  print("| implementation | KD step (ms) | student step (ms) | teacher forward (ms) | KD overhead ratio | floor / KD step |")
  print("|---|---|---|---|---|---|")
  for name, m in med.items():
    overhead = m["kd"] / (m["student"] + m["teacher"])
    print(f"| {name} | {1e3 * m['kd']:.0f} | {1e3 * m['student']:.0f} | {1e3 * m['teacher']:.0f} | "
          f"{overhead:.3f} | {floor / m['kd']:.0%} |")
  if "PyTorch eager" in med:
    ref = med["PyTorch eager"]
    for name, m in med.items():
      if name != "PyTorch eager":
        print(f"| {name} / PyTorch | {m['kd'] / ref['kd']:.2f}x | {m['student'] / ref['student']:.2f}x | "
              f"{m['teacher'] / ref['teacher']:.2f}x | | |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"times": times, "medians": med, "loads": loads,
                                                   "info": infos}, indent=1))


if __name__ == "__main__":
  main()
