"""End-to-end LLM distillation: a llama teacher on stdlib instruction data and its quarter-size students.

  python paper_repro/llm_distill/run.py [--workdir runs/llm_distill] [--seeds 3] [--methods sft,kd,...]
      [--quick] [--check-export PYTHON] [--out FILE]

1. ``build_data.py``: prompt/completion records (signature + docstring -> body) of this interpreter's
   standard library and two BPE tokenizers trained here (``WORKDIR/data``).
2. The teacher (``configs/llm_distill.py:teacher``, a llama, CE on the completions) with ``kdlab
   train``, exported with ``kdlab export`` to ``WORKDIR/teacher_hf``; the students distil from that
   Hugging Face directory (``cache`` from the teacher's run: the cache fingerprints a kdlab checkpoint).
3. The students (``configs/llm_distill.py:METHOD``; all seeds in one vmapped step per method):
   sft, kd, cache (built first by ``kdlab cache-teacher``), reverse_kl, jsd, seqkd (data from ``kdlab
   generate-data``), gkd (on-policy) and xtok (another tokenizer); each seed exported with ``kdlab
   export`` to ``WORKDIR/export/METHOD/seedN``.
4. Evaluation, as MiniLLM and DistiLLM evaluate: ROUGE-L F1 of greedy completions of the held-out
   prompts against the reference bodies (:func:`rouge_l`, over code words), the validation NLL of
   the completions (per token and, comparable across tokenizers, per character) and KL(teacher ||
   student) on them (same-tokenizer students), mean +/- std over seeds, in ``results.md`` beside this
   file. ``--check-export PYTHON`` loads every exported student with ``transformers.AutoModelForCausalLM``
   in that interpreter (a venv with torch and transformers) and compares its logits with kdlab's.

Finished stages are reused (runs with a ``summary.json``, built data, exports, evaluations), so an
interrupted reproduction resumes with the same command. ``--quick``: tiny models, 1 seed, a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np

from kdlab.repro import StageTimes

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build_data  # noqa: E402

CONFIG = str(ROOT / "configs" / "llm_distill.py")
METHODS = ("sft", "kd", "cache", "reverse_kl", "jsd", "seqkd", "gkd", "xtok")
LABELS = {
    "teacher": "teacher (CE)",
    "sft": "SFT: CE on the data",
    "kd": "KD: forward KL + CE",
    "cache": "KD from the compact top-k cache + CE",
    "reverse_kl": "reverse KL + CE",
    "jsd": "JSD(0.5) + CE",
    "seqkd": "sequence-level KD: CE on teacher replies",
    "gkd": "on-policy GKD: JSD(0.5), lambda 0.5",
    "xtok": "cross-tokenizer: aligned KD + ULD + CE",
}
# What the papers report for each method relative to supervised KD on ROUGE-L (qualitative; their
# numbers are for GPT-2 / OPT / LLaMA students on Dolly, Self-Instruct, Vicuna, S-NI, UnNI).
PAPER_DIRECTION = {
    "sft": "baseline (MiniLLM: 'SFT w/o KD'; usually close to KD)",
    "kd": "the supervised-KD reference",
    "cache": "not in the papers (same loss as KD, top-k teacher)",
    "reverse_kl": "> KD (MiniLLM: mode-seeking reverse KL beats forward KL)",
    "jsd": "> KD (DistiLLM's table: JSD / skew KL at or above KD)",
    "seqkd": "about KD (MiniLLM, DistiLLM: SeqKD no better than KD)",
    "gkd": "> KD (GKD, DistiLLM: on-policy data beats supervised KD)",
    "xtok": "not in the papers (ULD, ALM-style alignment papers: below same-tokenizer KD)",
}
SETTINGS = {  # what the full run and --quick use; every field the results depend on is here or in the config
    "full": dict(max_train=None, max_validation=None, teacher_steps=400, student_steps=200, new=64, k=64,
                 build=dict(vocab=2048, vocab_alt=1536)),
    "quick": dict(max_train=96, max_validation=12, teacher_steps=8, student_steps=4, new=16, k=8,
                  build=dict(vocab=2048, vocab_alt=1536)),
}


# --- ROUGE-L ----------------------------------------------------------------------------------------

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
  """The words ROUGE-L compares: runs of letters/digits/underscores and single punctuation characters
  (code has few spaces around its operators, so whitespace words would glue them to the names)."""
  return WORD.findall(text)


def lcs(a: list[str], b: list[str]) -> int:
  """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) len(b)) dynamic programme)."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
  """ROUGE-L F1 (beta = 1) of ``candidate`` against ``reference`` over :func:`words`; 1 when both are empty."""
  c, r = words(candidate), words(reference)
  if not c and not r:
    return 1.0
  n = lcs(c, r)
  if n == 0:
    return 0.0
  precision, recall = n / len(c), n / len(r)
  return 2 * precision * recall / (precision + recall)


# --- stages -----------------------------------------------------------------------------------------

def kdlab(*argv: str) -> None:
  """Runs the ``kdlab`` CLI in this process (its public commands); a non-zero exit stops the runner."""
  from kdlab import cli
  print("  kdlab " + " ".join(argv), flush=True)
  status = cli.main(list(argv))
  if status:
    raise SystemExit(f"llm_distill: kdlab {argv[0]} failed (exit {status})")


def spec(variant: str, root: pathlib.Path, setting: dict, quick: bool, steps: int, **extra: str) -> str:
  """The ``--config`` argument of ``variant``."""
  options = {"data": str(root / "data"), "steps": str(steps), "new": str(setting["new"]), "k": str(setting["k"]),
             **extra}
  if variant != "teacher":
    options["teacher"] = str(root / "teacher_hf")
  return f"{CONFIG}:{variant}," + ",".join(f"{k}={v}" for k, v in options.items()) + (",quick" if quick else "")


def stage(root: pathlib.Path, times: StageTimes, name: str, done: pathlib.Path, *argv: str) -> None:
  """Runs ``kdlab ARGV`` unless ``done`` exists; adds its time to stage ``name``."""
  if done.exists():
    return
  t0 = time.time()
  kdlab(*argv)
  times.add(name, time.time() - t0)


def seed_dirs(run_dir: pathlib.Path, seeds: list[int]) -> list[pathlib.Path]:
  return [run_dir / f"seed{s}" for s in seeds] if len(seeds) > 1 else [run_dir]


# --- evaluation -------------------------------------------------------------------------------------

def load_student(workdir: pathlib.Path) -> Any:
  """The run's model with its latest checkpoint."""
  from kdlab.train import teachers as teacherlib
  model = json.loads((workdir / "config.json").read_text())["model"]
  return teacherlib.load_model(model, workdir / "checkpoints", str(workdir))


def completions(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                batch: int = 64) -> list[str]:
  """Greedy completions of ``prompts`` (``[prompt tokens]``, no BOS, as kdlab.data.instruct encodes
  prompt/completion records), cut at the first EOS, decoded."""
  from kdlab.sampling import generate
  eos, pad = tokenizer.eos_id, tokenizer.pad_id or 0
  out = []
  for i in range(0, len(prompts), batch):
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[i:i + batch]]
    width = max(len(x) for x in ids)
    rows = np.full((len(ids), width), pad, np.int32)
    for r, x in enumerate(ids):
      rows[r, :len(x)] = x
    lengths = np.array([len(x) for x in ids], np.int32)
    gen = generate(model, rows, max_new_tokens=max_new_tokens, temperature=0.0, prompt_lengths=lengths, pad_id=pad)
    tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
    for r in range(len(ids)):
      new = [int(t) for t in tokens[r][mask[r]]]
      if eos in new:
        new = new[:new.index(eos)]
      out.append(tokenizer.decode(new, skip_special_tokens=True))
  return out


def evaluate(workdir: pathlib.Path, root: pathlib.Path, setting: dict) -> dict[str, float]:
  """ROUGE-L of the run's greedy completions of the validation prompts, its validation NLL per token
  and per character, and KL to the teacher (from the run's summary); cached in ``eval.json``."""
  path = workdir / "eval.json"
  if path.exists():
    return json.loads(path.read_text())
  from kdlab.data import hf_tokenizer
  config = json.loads((workdir / "config.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  tokenizer = hf_tokenizer.load(config["data"]["tokenizer"])
  records = [json.loads(l) for l in (root / "data" / "data" / "validation" / "stdlib.jsonl").read_text().splitlines()]
  texts = completions(load_student(workdir), tokenizer, [r["prompt"] for r in records], setting["new"])
  scores = [rouge_l(t, r["completion"]) for t, r in zip(texts, records)]
  chars = sum(len(r["completion"]) + 1 for r in records)  # + 1: the EOS, counted by the loss
  result = {"rouge_l": 100 * float(np.mean(scores)), "val_nll": summary["val_loss"],
            "val_nll_char": summary["val_loss"] * summary["val_tokens"] / chars,
            "kl_teacher": summary.get("kl_teacher"), "val_tokens": summary["val_tokens"],
            "val_examples": summary.get("val_examples"), "example": texts[0]}
  path.write_text(json.dumps(result, indent=2))
  return result


def check_exports(dirs: list[pathlib.Path], python: str) -> list[dict]:
  """Loads each exported Hugging Face directory with ``transformers.AutoModelForCausalLM`` (in the
  ``python`` interpreter) and compares its logits on the first validation prompt with kdlab's model."""
  import jax.numpy as jnp

  from kdlab.data import hf_tokenizer
  from kdlab.models import pretrained
  results = []
  for d in dirs:
    tok = hf_tokenizer.load(f"hf:{d}")
    ids = tok.encode("def f(x):\n    \"\"\"Return x.\"\"\"\n    return x\n", add_special_tokens=False)[:32]
    logits, _ = pretrained.from_pretrained(d)(jnp.asarray(ids[None]), train=False)  # (logits, cache)
    ours = np.asarray(logits, np.float32)[0]
    script = ("import sys, json, torch, transformers\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "ids = torch.tensor([json.loads(sys.argv[2])])\n"
              "with torch.no_grad(): print(json.dumps(m(ids).logits[0].float().tolist()))\n")
    proc = subprocess.run([python, "-c", script, str(d), json.dumps([int(i) for i in ids])], capture_output=True,
                          text=True)
    if proc.returncode:
      results.append({"dir": str(d), "loads": False, "error": proc.stderr.strip().splitlines()[-1:]})
      continue
    theirs = np.asarray(json.loads(proc.stdout), np.float32)
    results.append({"dir": str(d), "loads": True, "max_abs_logit_diff": float(np.max(np.abs(theirs - ours)))})
  return results


# --- the runner -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/llm_distill")
  parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--quick", action="store_true", help="tiny models, 1 seed, a few steps (smoke test)")
  parser.add_argument("--check-export", default=None, metavar="PYTHON",
                      help="load every exported student with transformers in this interpreter (a venv with "
                           "torch, transformers and safetensors: benchmarks/peers/trl-requirements.txt) and "
                           "compare logits")
  parser.add_argument("--out", default=None, help="default: results.md beside this file (quick: WORKDIR/results.md)")
  args = parser.parse_args(argv)
  if args.check_export and not os.access(args.check_export, os.X_OK):
    raise SystemExit(f"llm_distill: error: --check-export={args.check_export}: not an executable; give the python of "
                     f"a venv with torch, transformers and safetensors")
  methods = [m for m in args.methods.split(",") if m]
  if sorted(set(methods) - set(METHODS)) or not methods:
    parser.error(f"--methods: a non-empty subset of {','.join(METHODS)}")
  setting = SETTINGS["quick" if args.quick else "full"]
  seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
  root = pathlib.Path(args.workdir).resolve()
  root.mkdir(parents=True, exist_ok=True)
  times = StageTimes(root)
  start, load_start = time.time(), " / ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"llm_distill: {', '.join(methods)}, seeds {seeds}, {'quick' if args.quick else 'full'}, in {root}",
        flush=True)

  t0 = time.time()
  meta = build_data.build(root / "data", max_train=setting["max_train"], max_validation=setting["max_validation"],
                          **setting["build"])
  times.values.setdefault("data", time.time() - t0)

  q, steps = args.quick, setting["student_steps"]
  flags = ("--nowandb", "--no-progress")
  stage(root, times, "teacher", root / "teacher" / "summary.json", "train",
        f"--config={spec('teacher', root, setting, q, setting['teacher_steps'])}", f"--workdir={root / 'teacher'}",
        *flags)
  stage(root, times, "teacher/export", root / "teacher_hf", "export", f"--workdir={root / 'teacher'}",
        f"--out={root / 'teacher_hf'}")
  extra: dict[str, dict[str, str]] = {m: {} for m in methods}
  if "cache" in methods:
    extra["cache"] = {"cache": str(root / "teacher_cache")}
    stage(root, times, "cache-teacher", root / "teacher_cache" / "meta.json", "cache-teacher",
          f"--config={spec('cache', root, setting, q, steps, **extra['cache'])}", f"--out={root / 'teacher_cache'}",
          "--no-progress")
  if "seqkd" in methods:
    extra["seqkd"] = {"gen": str(root / "teacher_data")}
    stage(root, times, "generate-data", root / "teacher_data" / "meta.json", "generate-data",
          f"--config={spec('seqkd', root, setting, q, steps, **extra['seqkd'])}", f"--out={root / 'teacher_data'}",
          "--no-progress")

  results: dict[str, list[dict]] = {}
  exports = []
  for method in methods:
    run_dir = root / method
    stage(root, times, method, run_dir / "summary.json", "train",
          f"--config={spec(method, root, setting, q, steps, **extra[method])}", f"--workdir={run_dir}", *flags,
          f"--config.vmap_seeds={len(seeds) if len(seeds) > 1 else 0}", f"--config.seed={seeds[0]}")
    results[method] = []
    for seed, workdir in zip(seeds, seed_dirs(run_dir, seeds)):
      out = root / "export" / method / f"seed{seed}"
      stage(root, times, f"{method}/export", out, "export", f"--workdir={workdir}", f"--out={out}")
      exports.append(out)
      t0 = time.time()
      results[method].append(evaluate(workdir, root, setting))
      times.add(f"{method}/eval", time.time() - t0)
  t0 = time.time()
  teacher = evaluate(root / "teacher", root, setting)
  times.add("teacher/eval", time.time() - t0)
  checks = None
  if args.check_export:
    checks = check_exports([root / "teacher_hf", *exports], args.check_export)
    (root / "export_check.json").write_text(json.dumps(checks, indent=2))
    for c in checks:
      print(f"  {c['dir']}: " + (f"loads, max |logit diff| {c['max_abs_logit_diff']:.2e}" if c["loads"]
                                  else f"does not load: {c['error']}"), flush=True)
  text = report(args, root, methods, seeds, results, teacher, meta, times, time.time() - start, load_start, checks)
  out = pathlib.Path(args.out) if args.out else (root / "results.md" if args.quick else HERE / "results.md")
  out.write_text(text)
  print()
  print(text)
  return 0


def report(args: argparse.Namespace, root: pathlib.Path, methods: list[str], seeds: list[int],
           results: dict[str, list[dict]], teacher: dict, meta: dict, times: StageTimes, total: float, load_start: str,
           checks: list[dict] | None) -> str:
  """results.md: the table (mean +/- std over seeds), the papers' direction beside ours, the setting."""
  from kdlab.repro import cpu_name, mean_std

  def col(runs: list[dict], key: str, fmt: str) -> str:
    values = [r.get(key) for r in runs]
    return "-" if any(v is None for v in values) else mean_std(values, fmt)

  rouge = {m: float(np.mean([r["rouge_l"] for r in results[m]])) for m in methods}
  rouge_sd = {m: float(np.std([r["rouge_l"] for r in results[m]], ddof=1)) if len(results[m]) > 1 else 0.0
              for m in methods}
  rows = [f"| {LABELS['teacher']} | 1 | {teacher['rouge_l']:.2f} | {teacher['val_nll']:.4f} | "
          f"{teacher['val_nll_char']:.4f} | - | {times.get('teacher') / 60:.1f} | - |"]
  for m in methods:
    r = results[m]
    minutes = times.get(m, f"{m}/eval", *(("cache-teacher",) if m == "cache" else ()),
                        *(("generate-data",) if m == "seqkd" else ())) / 60
    rows.append(f"| {LABELS[m]} | {len(r)} | {col(r, 'rouge_l', '{:.2f}')} | {col(r, 'val_nll', '{:.4f}')} | "
                f"{col(r, 'val_nll_char', '{:.4f}')} | {col(r, 'kl_teacher', '{:.4f}')} | {minutes:.1f} | "
                f"{PAPER_DIRECTION[m]} |")
  findings = ["- Ranking by ROUGE-L (higher is better): "
              + " > ".join(f"{m} ({rouge[m]:.2f})" for m in sorted(methods, key=rouge.get, reverse=True)) + "."]
  if "kd" in methods:
    for m in [m for m in ("reverse_kl", "jsd", "gkd") if m in methods]:
      gap = rouge[m] - rouge["kd"]
      clear = abs(gap) > max(rouge_sd[m], rouge_sd["kd"])
      verdict = ("agrees with the papers" if gap > 0 else "differs from the papers") + (
          "" if clear or len(seeds) < 2 else " (within one seed std: not a clear difference)")
      findings.append(f"- {LABELS[m]} vs supervised KD: {rouge[m]:.2f} vs {rouge['kd']:.2f} ROUGE-L, {verdict}.")
    if "seqkd" in methods:
      findings.append(f"- Sequence-level KD vs KD: {rouge['seqkd']:.2f} vs {rouge['kd']:.2f} (the papers: about the "
                      f"same or below).")
    if "cache" in methods:
      findings.append(f"- KD from the top-{json.loads((root / 'teacher_cache' / 'meta.json').read_text())['k']} "
                      f"cache vs the live teacher: {rouge['cache']:.2f} vs {rouge['kd']:.2f} ROUGE-L, validation "
                      f"KL {np.mean([r['kl_teacher'] for r in results['cache']]):.4f} vs "
                      f"{np.mean([r['kl_teacher'] for r in results['kd']]):.4f}.")
  if "sft" in methods:
    findings.append(f"- The teacher scores {teacher['rouge_l']:.2f} ROUGE-L; SFT alone {rouge['sft']:.2f}.")
  saved = lambda p: json.loads((p / "config.json").read_text())  # noqa: E731
  t_cfg = saved(root / "teacher")
  s_cfg = saved(seed_dirs(root / methods[0], seeds)[0])
  n_params = lambda m: (2 * m["vocab_size"] * m["hidden_size"] + m["num_hidden_layers"] * (  # noqa: E731
      m["hidden_size"] * m["hidden_size"] * (2 + 2 * m["num_key_value_heads"] / m["num_attention_heads"])
      + 3 * m["hidden_size"] * m["intermediate_size"] + 2 * m["hidden_size"]) + m["hidden_size"])
  command = "python paper_repro/llm_distill/run.py" + (" --quick" if args.quick else "") + (
      f" --seeds {len(seeds)}" if len(seeds) != (1 if args.quick else 3) else "") + (
      f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "") + (
      " --check-export PYTHON" if args.check_export else "")
  lines = [
      "# End-to-end LLM distillation: a llama teacher and its quarter-size students on stdlib functions",
      "",
      f"Produced by `{command}` (workdir `{root}`); every number below was measured by it.",
      "",
      f"Data: {meta['train']:,} train / {meta['validation']:,} held-out records from Python {meta['python']}'s "
      f"standard library (prompt = signature and docstring, completion = body, each at most "
      f"{meta['max_prompt']} / {meta['max_completion']} characters; `build_data.py`). Tokenizers: BPE trained "
      f"here on the train split, {meta['vocab']} ids byte-level (teacher, students) and {meta['vocab_alt']} ids "
      f"Metaspace with split digits (the cross-tokenizer student). Teacher: llama hidden "
      f"{t_cfg['model']['hidden_size']}, {t_cfg['model']['num_hidden_layers']} layers, "
      f"{n_params(t_cfg['model']) / 1e6:.2f}M parameters, {t_cfg['train']['num_steps']} steps of "
      f"{t_cfg['data']['batch_size']} packed rows of {t_cfg['data']['seq_len']} tokens. Students: llama hidden "
      f"{s_cfg['model']['hidden_size']}, {s_cfg['model']['num_hidden_layers']} layers, "
      f"{n_params(s_cfg['model']) / 1e6:.2f}M parameters (vocab 2048), {s_cfg['train']['num_steps']} steps of "
      f"{s_cfg['data']['batch_size']} examples (one per row), AdamW {s_cfg['optimizer']['learning_rate']:g} "
      f"cosine, from random initialization; {len(seeds)} seed(s) in one vmapped step per method.",
      "",
      f"Evaluation (as MiniLLM and DistiLLM evaluate): ROUGE-L F1 (x100, over code words: `\\w+` runs and single "
      f"punctuation) of greedy completions (at most {SETTINGS['quick' if args.quick else 'full']['new']} tokens, "
      f"cut at EOS) of the {meta['validation']} held-out prompts against their bodies; validation NLL of the "
      f"completions (nats per token, and per character: comparable across tokenizers); KL(teacher || student) "
      f"per completion token (same-tokenizer students). Mean +/- std over seeds.",
      "",
      "| method | seeds | ROUGE-L | val NLL / token | val NLL / char | KL(t \\|\\| s) | minutes | papers (vs KD) |",
      "|---|---|---|---|---|---|---|---|",
      *rows,
      "",
      "## Where we agree with the papers and where we do not",
      "",
      *findings,
      "- Scale: the papers distil GPT-2 / OPT / LLaMA models (0.1B-13B) on instruction-following data scored "
      "against human-written replies; here ~1M-parameter llamas learn function bodies from docstrings, where "
      "ROUGE-L rewards the exact code of the reference; a gap smaller than the seeds' std is no finding.",
      "- MiniLLM's reverse KL is optimized with a policy gradient on the student's samples; here reverse KL is "
      "the token-level term on the data (and on-policy GKD the JSD on the student's own replies).",
      "",
      f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, load average at start {load_start}; total wall time of "
      f"this invocation {total / 60:.1f} minutes (stages reused from earlier invocations keep their recorded time: "
      f"{times.get(*times.values) / 60:.1f} minutes in all).",
  ]
  if checks is not None:
    ok = [c for c in checks if c["loads"]]
    worst = max((c["max_abs_logit_diff"] for c in ok), default=float("nan"))
    lines += ["", f"Export check: {len(ok)} of {len(checks)} exported models (the teacher and every student "
                  f"seed) load with transformers.AutoModelForCausalLM.from_pretrained; largest "
                  f"|logit difference| against kdlab's model {worst:.2e}."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  raise SystemExit(main())
