"""One LLM distillation step, kdlab against TRL (PyTorch) and Tunix (JAX), side by side; and generation.

  .venv/bin/python benchmarks/llm_kd_step.py --trl-python /work/trlvenv/bin/python \\
      --tunix-python /work/tunixvenv/bin/python --vocab 32000,128256 --write

The step (the same in every framework, float32): the ``llama`` teacher's forward (no gradient), the
student's forward and backward, loss = 0.5 CE + 0.5 KL(p_teacher || p_student) at T = 1, both
averaged over the completion tokens of the batch (the second half of every sequence: every row
has the same number, so a per-sequence and a per-token mean agree), and an AdamW update (lr 1e-4,
no weight decay, no clipping). Teacher: hidden 768, 12 layers, 12 heads (4 key/value), MLP 3072,
untied (153M parameters at vocab 32k); student: hidden 512, 6 layers, 8 heads (4 key/value), MLP
1408, tied embeddings (34M at vocab 32k). Batch 4 x 512 tokens.

Set-up: the driver writes both models as Hugging Face directories with kdlab's
``save_pretrained`` (random weights, seed 0/1), and ``batch.npz`` / ``hparams.json`` (the worker
protocol: benchmarks/peers/README.md); every framework loads those same files. Before timing, each
worker reports its loss on the initial weights; the driver prints them side by side (same weights,
batch and math: they must agree to about 1e-4).

Workers (benchmarks/workers.py), each in its own process and virtual environment:
  kdlab (plain), kdlab (fused)  this file with ``--worker``: the code ``kdlab train`` runs
                                (``kdlab.objective.build``, ``kdlab.train.optim.make``,
                                ``make_train_step``, jitted with the state donated), the models read
                                with ``kdlab.models.pretrained.from_pretrained``.
  TRL (eager), TRL (sdpa)       benchmarks/llm_kd_step_trl.py under ``--trl-python``.
  Tunix                         benchmarks/llm_kd_step_tunix.py under ``--tunix-python``.

Timed per worker: ``kd`` (the whole step), ``student`` (the student's step with CE only) and
``teacher`` (the teacher's forward); the workers take turns, ``--iters`` steps per turn, for
``--rounds`` rounds; medians. Peak memory: each worker's peak resident set (``ru_maxrss``) at
the end; every worker runs the three ops, so it is the larger of the kd step's and the set-up's.
Then kdlab's compiled kd step's FLOPs (XLA's cost analysis) against its time and against this
machine's measured float32 matrix-multiply rate (``--peak`` measures it).

Generation (``--generate``): kdlab's ``generate`` (KV cache, one ``lax.scan``) against
transformers' ``generate`` (benchmarks/llm_generate_hf.py) on the student, 16 prompts of 32 tokens,
128 new tokens, greedy and sampled (temperature 1, no top-k).

``--tiny``: small shapes (seconds; the test suite runs the kdlab side of it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workers import Worker, maxrss_mib, serve, timed  # noqa: E402

TEACHER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               num_key_value_heads=4, tie_word_embeddings=False)
STUDENT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=4, tie_word_embeddings=True)
TINY_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)
TINY_STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True)
HPARAMS = {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "alpha_ce": 0.5,
           "temperature": 1.0, "threads": 2}
OPS = ("kd", "student", "teacher")


# --- set-up -----------------------------------------------------------------------------------------

def make_setup(out: pathlib.Path, *, vocab: int, batch: int, seq_len: int, tiny: bool, gen_batch: int = 16,
               prompt_len: int = 32, new_tokens: int = 128) -> pathlib.Path:
  """Writes SETUP: ``teacher/``, ``student/`` (Hugging Face llama directories), ``batch.npz``,
  ``hparams.json``. An existing complete SETUP of the same shapes is kept."""
  from kdlab import models
  from kdlab.models.pretrained import save_pretrained
  stamp = {"vocab": vocab, "batch": batch, "seq_len": seq_len, "tiny": tiny, "gen_batch": gen_batch,
           "prompt_len": prompt_len, "new_tokens": new_tokens}
  done = out / "setup.json"
  if done.is_file() and json.loads(done.read_text()) == stamp:
    return out
  out.mkdir(parents=True, exist_ok=True)
  max_len = max(seq_len, prompt_len + new_tokens)
  for name, sizes, seed in (("teacher", TINY_TEACHER if tiny else TEACHER, 0),
                            ("student", TINY_STUDENT if tiny else STUDENT, 1)):
    target = out / name
    if target.exists():
      import shutil
      shutil.rmtree(target)
    model = models.create("llama", vocab_size=vocab, max_position_embeddings=max(2048, max_len), rope_theta=500000.0,
                          rms_norm_eps=1e-5, seed=seed, **sizes)
    save_pretrained(model, target)
  rng = np.random.default_rng(0)
  input_ids = rng.integers(0, vocab, (batch, seq_len), dtype=np.int64).astype(np.int32)
  labels = input_ids.astype(np.int64)
  labels[:, : seq_len // 2] = -100  # the prompt half: not predicted (HF convention, unshifted)
  prompts = rng.integers(0, vocab, (gen_batch, prompt_len), dtype=np.int64).astype(np.int32)
  np.savez(out / "batch.npz", input_ids=input_ids, labels=labels, prompts=prompts, prompt_len=prompt_len,
           new_tokens=new_tokens)
  (out / "hparams.json").write_text(json.dumps(HPARAMS))
  done.write_text(json.dumps(stamp))
  return out


def parameter_count(directory: pathlib.Path) -> int:
  """Parameters stored in a Hugging Face directory's safetensors files."""
  from safetensors import safe_open
  total = 0
  for f in sorted(directory.glob("*.safetensors")):
    with safe_open(str(f), "np") as st:
      for key in st.keys():
        total += int(np.prod(st.get_slice(key).get_shape()))
  return total


# --- the kdlab worker ---------------------------------------------------------------------------------

def kdlab_batch(input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """HF-style ``input_ids`` / ``labels`` (-100: not predicted, unshifted) -> kdlab's LM batch: position
  ``t`` predicts ``targets[t] = ids[t + 1]`` and counts when ``labels[t + 1] != -100``."""
  targets = np.concatenate([input_ids[:, 1:], np.zeros_like(input_ids[:, :1])], axis=1).astype(np.int32)
  token_mask = np.concatenate([labels[:, 1:] != -100, np.zeros_like(input_ids[:, :1], bool)], axis=1)
  b = input_ids.shape[0]
  return {"tokens": input_ids.astype(np.int32), "targets": targets, "token_mask": token_mask.astype(np.float32),
          "index": np.arange(b, dtype=np.int32), "mask": np.ones(b, bool)}


class KdlabBench:
  """kdlab's kd / student steps and teacher forward, compiled, with their state.

  ``teacher``, ``student``: kdlab models; ``batch``: :func:`kdlab_batch`'s dict; ``hp``: the
  hyperparameters (``HPARAMS``); ``impl``: the kd term's ``impl`` (plain / chunked / fused; fused also
  computes the CE term in the same pass over the output head, so no [B, L, V] logits exist);
  ``ops``: which of :data:`OPS` to compile.
  """

  def __init__(self, teacher: Any, student: Any, batch: dict[str, np.ndarray], hp: dict[str, Any], impl: str,
               ops: tuple[str, ...] = OPS, init_loss: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kdlab import objective as objectives
    from kdlab.train import optim
    from kdlab.train import tasks as tasklib
    from kdlab.train.state import Learner, init_state
    from kdlab.train.step import Teacher, forward, make_train_step, run_teachers

    self.jax = jax
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    self.student_model = student
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    self.teacher_vars = [(nnx.to_pure_dict(t_params), nnx.to_pure_dict(t_rest))]
    teachers = [Teacher("t0", t_graphdef)]
    task = tasklib.LanguageModel()
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}

    def out_shape(model):
      return jax.eval_shape(lambda m, x: forward(m, x, train=False), model, abstract_batch["tokens"])

    s_out, t_out = out_shape(student), out_shape(teacher)
    alpha = hp["alpha_ce"]
    # impl="fused": CE and KL in one chunked pass over the output head (no [B, L, V] logits).
    ce_impl = dict(impl="fused") if impl == "fused" else {}
    specs = {"kd": [dict(loss="kd", weight=1.0 - alpha, temperature=hp["temperature"], impl=impl),
                    dict(loss="ce", weight=alpha, **ce_impl)],
             "student": [dict(loss="ce", weight=1.0, **ce_impl)]}
    optimizer = dict(name="adamw", learning_rate=hp["lr"], weight_decay=hp["weight_decay"], schedule="constant",
                     warmup_epochs=0.0, kwargs=dict(b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"]))
    b = self.batch["tokens"].shape[0]
    self.steps: dict[str, Any] = {}
    self.flops: dict[str, float] = {}
    self.buffers: dict[str, dict[str, int]] = {}
    self.init_loss: dict[str, float] = {}
    for kind in (k for k in ("kd", "student") if k in ops):
      kd = kind == "kd"
      shapes = objectives.Shapes(s_out, [t_out] if kd else [], ["t0"] if kd else [], b, abstract_batch)
      objective = objectives.build(specs[kind], shapes, nnx.Rngs(1))
      tx = optim.make(optimizer, 1, 1_000_000)
      graphdef, state = init_state(Learner(student, objective.connectors()), tx, objective.init_state(), seed=0)
      state = jax.tree.map(jnp.copy, state)  # own buffers: the step donates them
      fn = make_train_step(graphdef, objective, tx, teachers if kd else [], task=task)
      t_vars = self.teacher_vars if kd else []
      step = jax.jit(fn, donate_argnums=(0,))
      compiled = step.lower(state, t_vars, self.batch).compile()
      if kd and init_loss:  # the initial weights' loss, on a copy (the compiled step donates its input)
        _, metrics = compiled(jax.tree.map(jnp.copy, state), t_vars, self.batch)
        self.init_loss = {k: float(v[0] / v[1]) for k, v in metrics.items() if k in ("loss", "task/ce", "distill/kd")}
      self.flops[kind] = _flops(compiled)
      self.buffers[kind] = _buffers(compiled)
      self.steps[kind] = [compiled, state, t_vars]
    if "teacher" in ops:
      teacher_forward = jax.jit(lambda v, x: run_teachers(teachers, v, x)[0].logits)
      self.teacher_forward = teacher_forward.lower(self.teacher_vars, self.batch["tokens"]).compile()
      self.flops["teacher"] = _flops(self.teacher_forward)

  @classmethod
  def from_setup(cls, setup: pathlib.Path, impl: str, ops: tuple[str, ...] = OPS, init_loss: bool = True
                 ) -> KdlabBench:
    """The models of SETUP's Hugging Face directories, read by kdlab's ``from_pretrained``."""
    from kdlab.models.pretrained import from_pretrained
    hp = json.loads((setup / "hparams.json").read_text())
    data = np.load(setup / "batch.npz")
    bench = cls(from_pretrained(setup / "teacher"), from_pretrained(setup / "student"),
                kdlab_batch(data["input_ids"], data["labels"]), hp, impl, ops, init_loss)
    bench.prompts, bench.new_tokens = data["prompts"], int(data["new_tokens"])
    return bench

  def run(self, op: str) -> None:
    if op == "teacher":
      self.jax.block_until_ready(self.teacher_forward(self.teacher_vars, self.batch["tokens"]))
      return
    entry = self.steps[op]
    entry[1], metrics = entry[0](entry[1], entry[2], self.batch)
    self.jax.block_until_ready((entry[1], metrics))

  def generate(self, prompts: np.ndarray, new_tokens: int, greedy: bool, n: int, warmup: int) -> list[float]:
    """Seconds per ``kdlab.generate`` call of the student (``prompts [B, P]``, ``new_tokens`` each)."""
    from kdlab import generate
    key = self.jax.random.key(0)

    def once():
      out = generate(self.student_model, prompts, max_new_tokens=new_tokens,
                     temperature=0.0 if greedy else 1.0, key=None if greedy else key)
      self.jax.block_until_ready(out.tokens)

    return timed(once, n, warmup)


def _flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled function (``cost_analysis``; a list of one dict on older jax)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _buffers(compiled: Any) -> dict[str, int]:
  """XLA's buffer plan of a compiled function, bytes: its arguments, outputs and temporaries (what the
  step allocates beyond its inputs and results)."""
  m = compiled.memory_analysis()
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "temporaries": int(m.temp_size_in_bytes)}


def matmul_peak(size: int = 2048, reps: int = 10) -> float:
  """This machine's float32 matrix-multiply rate in GFLOP/s: the best of several ``[size, size]``
  products chained in one jitted call."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def chain(a, b):
    def body(x, _):
      return jnp.tanh(x @ b) * 0.5, None
    return jax.lax.scan(body, a, None, length=reps)[0]

  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  times = timed(lambda: jax.block_until_ready(chain(a, a)), 5, 1)
  return 2 * size ** 3 * reps / min(times) / 1e9


def kdlab_worker(setup: pathlib.Path, impl: str, kd_only: bool) -> None:
  import jax
  bench = KdlabBench.from_setup(setup, impl, ("kd",) if kd_only else OPS, init_loss=not kd_only)

  def answer(req: dict) -> dict:
    op = req["op"]
    if op == "info":
      return {"framework": f"kdlab ({impl})", "jax": jax.__version__, "backend": jax.default_backend(),
              "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "flops": bench.flops, "buffers": bench.buffers}
    if op == "loss_at_init":
      loss = bench.init_loss
      return {"kd": loss["loss"], "ce": loss["task/ce"], "kl": loss["distill/kd"]}
    if op == "generate":
      return {"times": bench.generate(bench.prompts, bench.new_tokens, bool(req["greedy"]), int(req.get("n", 1)),
                                      int(req.get("warmup", 0))),
              "tokens": int(bench.prompts.shape[0]) * bench.new_tokens, "maxrss_mib": maxrss_mib()}
    if op == "peak":
      return {"gflops": matmul_peak()}
    return {"times": timed(lambda: bench.run(op), int(req.get("n", 1)), int(req.get("warmup", 0))),
            "loss": None, "maxrss_mib": maxrss_mib()}

  serve(answer)


# --- the driver -------------------------------------------------------------------------------------

def _commands(args: argparse.Namespace, setup: pathlib.Path) -> dict[str, tuple[list[str], dict[str, str] | None]]:
  """Each side's worker command and extra environment."""
  me = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--setup", str(setup)]
  sides = {f"kdlab ({impl})": (me + ["--impl", impl], None) for impl in args.kdlab_impls.split(",")}
  for variant in args.variant:  # "LABEL|IMPL|VAR=VALUE|...": one more kdlab worker
    label, impl, *assignments = variant.split("|")
    sides[f"kdlab ({label})"] = (me + ["--impl", impl], dict(a.split("=", 1) for a in assignments))
  if args.trl_python:
    for attn in args.trl_attn.split(","):
      sides[f"TRL ({attn})"] = ([args.trl_python, str(HERE / "llm_kd_step_trl.py"), "--setup", str(setup),
                                 "--attn", attn, "--serve"], None)
  if args.tunix_python:
    # --mask slice: Tunix's LogitStrategy sees the completion positions only, so its loss is the
    # protocol's (its own mask handling averages over every position; benchmarks/llm_kd_step_tunix.py).
    sides["Tunix"] = ([args.tunix_python, str(HERE / "llm_kd_step_tunix.py"), "--setup", str(setup), "--serve",
                       "--mask", "slice"], None)
  return sides


def _run_group(args: argparse.Namespace, commands: dict[str, tuple[list[str], dict[str, str] | None]],
               out: dict[str, Any]) -> None:
  """Starts these workers, then loss at init, warm-up and ``--rounds`` interleaved rounds; into ``out``."""
  sides = {name: Worker(cmd, env) for name, (cmd, env) in commands.items()}
  try:
    for name, side in sides.items():
      out["infos"][name] = side.request(op="info")
      out["losses"][name] = side.request(op="loss_at_init")
    for side in sides.values():  # compiles (JAX) and warms allocators (torch)
      for op in OPS:
        side.request(op=op, n=0, warmup=args.warmup)
    for name in sides:
      out["times"][name] = {op: [] for op in OPS}
    for _ in range(args.rounds):
      for op in OPS:
        for name, side in sides.items():
          out["times"][name][op] += side.request(op=op, n=args.iters)["times"]
      out["loads"].append(os.getloadavg()[0])
    for name, side in sides.items():
      out["rss_mib"][name] = side.request(op="teacher", n=0)["maxrss_mib"]
  finally:
    for side in sides.values():
      side.close()


def run_vocab(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
  """Set-up, loss agreement, interleaved timings and memory for one vocabulary size.

  At most ``--max-workers`` workers live at once (each holds its models and its peak memory): the
  sides are dealt round robin into groups of at most that size, each group interleaved on its own.
  """
  setup = make_setup(pathlib.Path(args.setup_dir) / f"v{vocab}", vocab=vocab, batch=args.batch, seq_len=args.seq_len,
                     tiny=args.tiny)
  out: dict[str, Any] = {"vocab": vocab, "params": {name: parameter_count(setup / name) for name in ("teacher", "student")},
                         "infos": {}, "losses": {}, "times": {}, "rss_mib": {}, "loads": [], "groups": [],
                         "tokens": args.batch * args.seq_len}
  commands = list(_commands(args, setup).items())
  groups = -(-len(commands) // (args.max_workers or len(commands)))
  for g in range(groups):  # round robin: kdlab's workers and the peers' spread over the groups
    group = dict(commands[g::groups])
    out["groups"].append(list(group))
    _run_group(args, group, out)
  out["matmul_gflops"] = matmul_peak()
  return out


def run_memory(args: argparse.Namespace, vocab: int) -> dict[str, dict[str, Any]]:
  """Each side's peak resident memory of the kd step alone: one fresh worker per side, one at a time,
  that builds its models and runs two kd steps (kdlab's worker compiles only the kd step); and XLA's
  buffer plan of kdlab's compiled kd step."""
  setup = make_setup(pathlib.Path(args.setup_dir) / f"v{vocab}", vocab=vocab, batch=args.batch, seq_len=args.seq_len,
                     tiny=args.tiny)
  rss, buffers = {}, {}
  for name, (cmd, env) in _commands(args, setup).items():
    kdlab = name.startswith("kdlab")
    worker = Worker(cmd + (["--kd-only"] if kdlab else []), env)
    try:
      rss[name] = worker.request(op="kd", n=1, warmup=1)["maxrss_mib"]
      if kdlab:
        buffers[name] = worker.request(op="info")["buffers"]["kd"]
    finally:
      worker.close()
  return {"rss_mib": rss, "xla_buffers": buffers}


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
  vocab = int(args.vocab.split(",")[0])
  setup = make_setup(pathlib.Path(args.setup_dir) / f"v{vocab}", vocab=vocab, batch=args.batch, seq_len=args.seq_len,
                     tiny=args.tiny)
  me = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--setup", str(setup), "--impl", "plain"]
  sides = {"kdlab generate (KV cache)": Worker(me)}
  if args.trl_python:
    sides["transformers generate"] = Worker([args.trl_python, str(HERE / "llm_generate_hf.py"), "--setup", str(setup),
                                             "--model", "student", "--serve"])
  out: dict[str, Any] = {"vocab": vocab, "times": {}, "tokens": {}}
  try:
    for greedy in (True, False):
      mode = "greedy" if greedy else "sampled"
      for name, side in sides.items():
        side.request(op="generate", greedy=greedy, n=0, warmup=1)
      for _ in range(args.rounds):
        for name, side in sides.items():
          reply = side.request(op="generate", greedy=greedy, n=1)
          out["times"].setdefault(f"{name}|{mode}", []).extend(reply["times"])
          out["tokens"][name] = reply["tokens"]
  finally:
    for side in sides.values():
      side.close()
  return out


def _med(ts: list[float]) -> float:
  return statistics.median(ts) if ts else float("nan")


def _header(title: str, command: str) -> list[str]:
  """A report's title, machine and command lines."""
  from kdlab.repro import cpu_name
  return [f"# {title}", "",
          f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_name()}), Linux {platform.release()}.",
          f"Command: `{command}`", ""]


def report(results: list[dict[str, Any]], generation: dict[str, Any] | None, command: str) -> str:
  lines = _header("LLM distillation step: kdlab vs TRL vs Tunix", command)
  for r in results:
    med = {n: {op: _med(ts) for op, ts in by.items()} for n, by in r["times"].items()}
    p = r["params"]
    lines += [f"## vocab {r['vocab']:,}", "",
              f"Teacher {p['teacher'] / 1e6:.1f}M parameters, student {p['student'] / 1e6:.1f}M; batch "
              f"{r['tokens']:,} tokens. Medians; 1-minute load average during the rounds "
              f"{min(r['loads']):.2f}-{max(r['loads']):.2f}. Measured float32 matmul rate "
              f"{r['matmul_gflops']:.0f} GFLOP/s." + (
                  " Workers alive at once, each group interleaved on its own: "
                  + "; ".join(", ".join(g) for g in r["groups"]) + "." if len(r["groups"]) > 1 else ""), "",
              "| framework | kd step s | tokens/s | teacher fwd s | student step s | rest (loss, update) s | "
              "peak RSS GiB | loss at init (CE / KL) |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in med.items():
      loss = r["losses"][name]
      rest = m["kd"] - m["teacher"] - m["student"]
      lines.append(f"| {name} | {m['kd']:.2f} | {r['tokens'] / m['kd']:,.0f} | {m['teacher']:.2f} | "
                   f"{m['student']:.2f} | {rest:.2f} | {r['rss_mib'][name] / 1024:.2f} | "
                   f"{loss['kd']:.5f} ({_fmt(loss.get('ce'))} / {_fmt(loss.get('kl'))}) |")
    kd_names = [n for n in med if n.startswith("kdlab")]
    peers = [n for n in med if not n.startswith("kdlab")]
    trl = [n for n in peers if n.startswith("TRL")]
    if peers:
      best_peer = min(peers, key=lambda n: med[n]["kd"])
      for n in kd_names:
        memory = (f"; peak RSS {r['rss_mib'][n] / min(r['rss_mib'][q] for q in trl):.2f} of TRL's smaller one"
                  if trl else "")
        lines.append(f"\n{n}: {med[best_peer]['kd'] / med[n]['kd']:.2f}x the tokens/s of the fastest peer "
                     f"({best_peer}){memory}.")
    # XLA's cost analysis does not count a while loop's body, so it misses the fused loss's matrix
    # products (a scan over chunks); they are the plain step's, so its count stands for every kdlab side.
    plain = "kdlab (plain)" if "kdlab (plain)" in kd_names else None
    for n in kd_names:
      f = r["infos"][plain or n]["flops"]
      rate = f["kd"] / med[n]["kd"] / 1e9
      counted = "" if plain in (None, n) else " (the plain step's count: the same products, which XLA does not count " \
                                              "inside the fused loss's loop)"
      lines.append(f"\n{n}: XLA counts {f['kd'] / 1e12:.2f} TFLOP in the kd step{counted} (teacher forward "
                   f"{f['teacher'] / 1e12:.2f}, student step {f['student'] / 1e12:.2f}): {rate:.0f} GFLOP/s, "
                   f"{rate / r['matmul_gflops']:.0%} of the measured matmul rate.")
    lines.append("")
  if generation:
    lines += ["## Generation (student, 16 prompts x 32 tokens, 128 new tokens)", "",
              "| generator | mode | median s | tokens/s |", "|---|---|---:|---:|"]
    for key, ts in generation["times"].items():
      name, mode = key.split("|")
      lines.append(f"| {name} | {mode} | {_med(ts):.2f} | {generation['tokens'][name] / _med(ts):,.0f} |")
  return "\n".join(lines) + "\n"


def memory_report(memory: dict[str, dict[str, Any]], command: str) -> str:
  """``--memory-only``'s table: each side's peak RSS of a worker that runs the kd step alone."""
  lines = _header("LLM distillation step: peak memory of the kd step alone", command) + [
      "One fresh worker per side, one at a time: it loads the teacher and the student, builds the kd step "
      "(kdlab's worker compiles only that step), runs a warm-up step and a timed one, and reports its peak "
      "resident memory (`ru_maxrss`: weights, optimizer state, batch, the step's temporaries, the "
      "framework's runtime and, for the JAX sides, the compiler).", ""]
  gib = 1 << 30
  for vocab, got in memory.items():
    rss, buffers = got["rss_mib"], got["xla_buffers"]
    trl = [v for n, v in rss.items() if n.startswith("TRL")]
    lines += [f"## vocab {int(vocab):,}", "",
              "| framework | peak RSS GiB | of TRL's smaller | XLA: arguments / outputs / temporaries GiB |",
              "|---|---:|---:|---|"]
    for name, mib in rss.items():
      share = f"{mib / min(trl):.2f}" if trl else "-"
      b = buffers.get(name)
      plan = (f"{b['arguments'] / gib:.2f} / {b['outputs'] / gib:.2f} / {b['temporaries'] / gib:.2f}" if b else "-")
      lines.append(f"| {name} | {mib / 1024:.2f} | {share} | {plan} |")
    lines.append("")
  return "\n".join(lines)


def _fmt(x: Any) -> str:
  return "-" if x is None else f"{x:.5f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trl-python", default=None, help="interpreter of the TRL venv (benchmarks/peers/README.md)")
  parser.add_argument("--trl-attn", default="eager,sdpa")
  parser.add_argument("--tunix-python", default=None, help="interpreter of the Tunix venv")
  parser.add_argument("--kdlab-impls", default="plain,fused")
  parser.add_argument("--variant", action="append", default=[], metavar="LABEL|IMPL|VAR=VALUE|...",
                      help="one more kdlab worker with this kd impl and environment (e.g. XLA_FLAGS=...)")
  parser.add_argument("--vocab", default="32000,128256")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--max-workers", type=int, default=0,
                      help="workers alive at once (0: all); the sides run in groups of this size")
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--generate", action="store_true", help="also time generation")
  parser.add_argument("--generate-only", action="store_true", help="time generation only (at the first vocab)")
  parser.add_argument("--memory-only", action="store_true",
                      help="each side's peak RSS of the kd step alone (one worker at a time)")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
  parser.add_argument("--setup-dir", default="/tmp/kdlab_llm_kd_step")
  parser.add_argument("--json", default=None, help="write the raw results here")
  parser.add_argument("--write", action="store_true",
                      help="write benchmarks/llm_kd_step.md (--memory-only: llm_kd_step_memory.md)")
  parser.add_argument("--report-from", default=None, metavar="JSON,JSON,...",
                      help="write the report of runs recorded with --json (their results and generation, in "
                           "order) instead of running; --command gives the report's command line")
  parser.add_argument("--command", default=None, help="the command line shown by --report-from")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--impl", default="plain", help=argparse.SUPPRESS)
  parser.add_argument("--kd-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    kdlab_worker(pathlib.Path(args.setup), args.impl, args.kd_only)
    return
  if args.tiny:
    args.batch, args.seq_len = min(args.batch, 2), min(args.seq_len, 32)
  if args.memory_only:
    memory = {v: run_memory(args, int(v)) for v in args.vocab.split(",")}
    text = memory_report(memory, "python " + " ".join(sys.argv))
    print(text)
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps({"memory": memory}, indent=1))
    if args.write:
      (HERE / "llm_kd_step_memory.md").write_text(text)
    return
  if args.report_from:
    recorded = [json.loads(pathlib.Path(f).read_text()) for f in args.report_from.split(",")]
    results = [r for run in recorded for r in run.get("results") or []]
    generation = next((run["generation"] for run in recorded if run.get("generation")), None)
    command = args.command or "python " + " ".join(sys.argv)
  else:
    results = [] if args.generate_only else [run_vocab(args, int(v)) for v in args.vocab.split(",")]
    generation = run_generation(args) if args.generate or args.generate_only else None
    command = "python " + " ".join(a for a in sys.argv)
  text = report(results, generation, command)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"results": results, "generation": generation}, indent=1))
  if args.write:
    (HERE / "llm_kd_step.md").write_text(text)


if __name__ == "__main__":
  main()
