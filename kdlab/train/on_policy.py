"""On-policy distillation: some train batches are the student's own samples (GKD, MiniLLM).

``config.on_policy = dict(fraction=lambda_, max_new_tokens=N, temperature=T, prompt_len=P,
top_k=None, top_p=None)`` (Agarwal et al. 2024, "On-Policy Distillation of Language Models";
Gu et al. 2024, "MiniLLM"). At every step a Bernoulli(``fraction``) draw decides whether the
batch is on-policy. If it is, :func:`rollout` replaces it: the first ``P`` tokens of each training
sequence are the prompt, the student (eval mode, no gradient) samples ``N`` tokens after it with
:func:`kdlab.sampling.generate`, and the batch becomes

  tokens      ``[B, L]``  prompt + generated tokens, padded with EOD (0) to the data's ``seq_len`` L
  targets     ``[B, L]``  the next token of ``tokens``
  token_mask  ``[B, L]``  1 exactly where the target is a student-generated token (``N`` per row)
  index, mask             kept

so the same compiled train step runs on it.

Instruction data (``config.data.source = "jsonl:PATH"`` / ``"parquet:PATH"``, or a dataset ``kdlab
generate-data`` built from one): the prompt of a batch row is one of its packed examples' prompts
(:mod:`kdlab.data.prompts`: the chat template's rendering up to the last assistant turn, ending with
the assistant header), drawn per row and step from the row's examples with the step's key (all
examples serve over the epochs; deterministic in ``(seed, step)``). ``prompt_len`` must be None. The
prompts are taken left-aligned with their real lengths, the student samples ``N`` tokens after each,
and the reply ends at the first stop token it samples (the tokenizer's EOS or the template's
end-of-turn token, :func:`kdlab.data.prompts.stop_tokens`), which is kept; what follows it is
padding. The batch becomes one unpacked example per row:

  tokens, targets  ``[B, L]``  prompt + reply, then the tokenizer's pad id (else its EOS)
  token_mask       ``[B, L]``  1 exactly where the target is a sampled token up to the stop token
  segment_ids      ``[B, L]``  1 on the prompt and the reply, 0 on padding
  positions        ``[B, L]``  0, 1, 2, ... on the prompt and the reply, 0 on padding

Every training example's prompt must leave ``N`` tokens in ``seq_len``: else a one-line error at
start-up names the record (nothing is written).

The teachers score the generated tokens inside the step as usual, and the token-level terms
(``kd``, ``reverse_kl``, ``jsd`` with ``beta``, ``tvd``)
average over the generated tokens only (their per-sequence mean over ``token_mask``). The other
batches are off-policy: the data, or teacher samples when ``config.data.source`` is a generated
dataset (``generated:DIR``, :mod:`kdlab.data.generated`). As in GKD, no gradient flows through
the sampling: the divergence is differentiated w.r.t. the student's token distributions at the
sampled prefixes (MiniLLM's single-step term; its policy-gradient term over long-term rewards is
not implemented).

Determinism: step ``s`` of seed ``k`` is on-policy iff ``uniform(k, s) < fraction`` with a numpy
generator seeded by ``(k, s)``, and samples with ``fold_in(fold_in(key(k), SALT), s)``: a resumed
run redraws the same choices and tokens. ``fraction=0`` never calls the generator: the run equals
the off-policy one exactly. Metrics: ``on_policy/fraction`` (share of on-policy batches in the
logging window) and ``time/generate_fraction`` (share of the step wall time spent generating;
the first step, which compiles the train step and the rollout, is left out).

:func:`teacher_nll_of_samples` is the sample-quality measure of the on-policy papers: the
teacher's per-token NLL of the student's own continuations of held-out prompts;
:func:`evaluate_samples` computes it for a finished run.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdlab.data import generated as gendata
from kdlab.data import instruct, prompts as promptlib
from kdlab.data.text import ByteTokenizer
from kdlab.errors import UserError
from kdlab.models.protocol import Decoder
from kdlab.sampling import check_sampling, generate

FIELD = "config.on_policy"
SALT = 0x6F6E5F70  # "on_p": separates the on-policy streams from the run's other uses of its seed
CHOICE = 0x63686F  # "cho": the key stream that picks each row's example (instruction data)
PAD = ByteTokenizer.EOD  # generated tokens past a row's end (the byte tokenizer's end-of-document)
_KEYS = ("fraction", "max_new_tokens", "temperature", "prompt_len", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """Validated ``config.on_policy`` (hashable: a static argument of the jitted rollout).

  ``seq_len`` is the data's tokens per sequence ``L``; ``prompt_len + max_new_tokens <= seq_len``.
  Instruction data (``examples=True``): ``prompt_len`` is the longest prompt (the prompts' padded
  width), ``stop_ids`` end a reply and ``pad_id`` pads the rows (module doc).
  """
  fraction: float
  max_new_tokens: int
  temperature: float
  prompt_len: int
  seq_len: int
  top_k: int | None = None
  top_p: float | None = None
  examples: bool = False
  stop_ids: tuple[int, ...] = ()
  pad_id: int = PAD


def _number(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def generation_fields(spec: dict[str, Any], *, field: str, allowed: Sequence[str], max_len: int | None,
                      seq_len: int, context: str = "the student's") -> tuple[int, float, int, int | None, float | None]:
  """Checks the sampling fields shared by ``config.on_policy`` and ``config.generate_data``.

  Returns ``(max_new_tokens, temperature, prompt_len, top_k, top_p)``; ``prompt_len`` defaults to
  ``seq_len - max_new_tokens``. Raises a one-line :class:`UserError` naming ``field.KEY``.
  """
  unknown = sorted(set(spec) - set(allowed))
  if unknown:
    raise UserError(f"{field}.{unknown[0]}: unknown field; use {', '.join(allowed)}")
  n, temperature = spec.get("max_new_tokens"), spec.get("temperature", 1.0)
  top_k, top_p = spec.get("top_k"), spec.get("top_p")
  check_sampling(n, temperature, top_k, top_p, field=field)
  prompt_len = spec.get("prompt_len")
  if prompt_len is None:
    prompt_len = seq_len - n
    if prompt_len < 1:
      raise UserError(f"{field}.max_new_tokens={n}: leaves no prompt in sequences of config.data.seq_len="
                      f"{seq_len} tokens; use max_new_tokens < {seq_len}")
  elif not _int(prompt_len) or prompt_len < 1:
    raise UserError(f"{field}.prompt_len={prompt_len!r}: must be an int >= 1 or None (seq_len - max_new_tokens)")
  if max_len is not None and prompt_len + n > max_len:
    raise UserError(f"{field}: prompt longer than the model's context: prompt_len {prompt_len} + "
                    f"max_new_tokens {n} > {context} max_len={max_len}; lower prompt_len or max_new_tokens")
  if prompt_len + n > seq_len:
    raise UserError(f"{field}: prompt_len {prompt_len} + max_new_tokens {n} > config.data.seq_len={seq_len}; "
                    f"lower prompt_len or max_new_tokens (or leave prompt_len unset: seq_len - max_new_tokens)")
  return (int(n), float(temperature), int(prompt_len), None if top_k is None else int(top_k),
          None if top_p is None else float(top_p))


def parse(config: Any, *, max_len: int | None, seq_len: int, examples: bool = False) -> OnPolicy | None:
  """Checks ``config.on_policy`` (None or empty: off); ``max_len`` is the student's context.

  ``examples``: the data are packed examples (instruction data): their prompts are the examples'
  own, so ``prompt_len`` must be None (:func:`example_spec` completes the spec from the data).

  Raises:
    UserError: one line naming the field: unknown keys, ``fraction`` outside [0, 1],
      ``max_new_tokens <= 0``, ``temperature < 0``, bad ``top_k``/``top_p``, a prompt plus
      ``max_new_tokens`` longer than the model's context or than ``config.data.seq_len``, or a
      ``prompt_len`` with instruction data.
  """
  spec = config.get("on_policy") if hasattr(config, "get") else None
  if not spec:
    return None
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  unknown = sorted(set(spec) - set(_KEYS))
  if unknown:
    raise UserError(f"{FIELD}.{unknown[0]}: unknown field; use {', '.join(_KEYS)}")
  fraction = spec.get("fraction")
  if not _number(fraction) or not 0.0 <= float(fraction) <= 1.0:
    raise UserError(f"{FIELD}.fraction={fraction!r}: must be a number in [0, 1] (lambda, the share of "
                    f"on-policy batches)")
  if examples and spec.get("prompt_len") is not None:
    raise UserError(f"{FIELD}.prompt_len={spec['prompt_len']!r}: the prompts of {config.data.source!r} are its "
                    f"examples' own (the chat up to the assistant's reply); leave prompt_len None")
  n, temperature, prompt_len, top_k, top_p = generation_fields(spec, field=FIELD, allowed=_KEYS, max_len=max_len,
                                                               seq_len=seq_len)
  return OnPolicy(fraction=float(fraction), max_new_tokens=n, temperature=temperature, prompt_len=prompt_len,
                  seq_len=int(seq_len), top_k=top_k, top_p=top_p)


def uses_examples(config: Any) -> bool:
  """Whether ``config.data.source`` gives packed examples (``jsonl:``/``parquet:`` instruction data, or a
  generated dataset built from such data) rather than cut text."""
  source = config.data.source
  if instruct.is_instruct_source(source):
    return True
  if gendata.is_generated(source):
    meta = gendata.read_meta(pathlib.Path(source[len(gendata.PREFIX):]))
    return bool(meta and meta.get("segments"))
  return False


def sampling_tokens(config: Any) -> tuple[tuple[int, ...], int]:
  """``(stop_ids, pad_id)`` of the run's data: a generated dataset's own (its ``meta.json``), else
  :func:`kdlab.data.prompts.stop_tokens` of ``config.data``."""
  source = config.data.source
  if gendata.is_generated(source):
    meta = gendata.read_meta(pathlib.Path(source[len(gendata.PREFIX):])) or {}
    if meta.get("segments"):
      return tuple(int(i) for i in meta["stop_ids"]), int(meta["pad_id"])
  return promptlib.stop_tokens(config.data)


def example_spec(config: Any, source: Any, spec: OnPolicy) -> tuple[OnPolicy, promptlib.Prompts]:
  """``spec`` completed for packed examples (prompt width, stop and pad ids) and the examples' prompts.

  Raises:
    UserError: one line naming the first record whose prompt leaves fewer than ``max_new_tokens``
      tokens in ``seq_len`` (or that has no prompt: text records, ``loss_mask="all"``).
  """
  loss_mask = config.data.get("loss_mask", "completion") if instruct.is_instruct_source(config.data.source) \
      else "completion"
  found = promptlib.find(source, max_new_tokens=spec.max_new_tokens, field=FIELD, loss_mask=loss_mask)
  stop_ids, pad_id = sampling_tokens(config)
  return dataclasses.replace(spec, prompt_len=found.width, examples=True, stop_ids=stop_ids, pad_id=pad_id), found


def check(config: Any, task: Any, student: Any) -> OnPolicy | None:
  """Start-up checks of ``config.on_policy`` against the task, the (abstract) student and, for
  instruction data, every training example's prompt (the split comes from the task's loader, which
  caches it)."""
  if not config.get("on_policy"):
    return None
  from kdlab.train import tasks
  if task is not tasks.LANGUAGE_MODEL:
    raise UserError(f"{FIELD}: on-policy distillation needs a language model on a text source, but "
                    f"config.data.source={config.data.source!r} is not one; set config.on_policy = None")
  if not isinstance(student, Decoder):
    raise UserError(f"{FIELD}: the student ({config.model.name!r}) cannot generate (no KV cache); use a decoder "
                    f"('gpt', 'llama', 'qwen2', 'qwen3', 'gemma3' or 'hf')")
  if config.get("teacher_cache"):
    raise UserError(f"{FIELD}: a teacher cache holds the teacher's outputs on the data, not on the student's "
                    f"samples; unset config.teacher_cache (the teacher runs live) or config.on_policy")
  if config.data.get("teacher_tokenizer"):
    raise UserError(f"{FIELD}: the student's samples have no teacher tokenization, so a teacher of another "
                    f"tokenizer (config.data.teacher_tokenizer) cannot score them; unset config.on_policy or "
                    f"config.data.teacher_tokenizer")
  examples = uses_examples(config)
  spec = parse(config, max_len=getattr(student, "max_len", None), seq_len=int(config.data.seq_len), examples=examples)
  if spec is not None and examples:
    spec, _ = example_spec(config, task.load(config.data)[0], spec)
  return spec


# --- the batch -----------------------------------------------------------------------------------

def as_batch(tokens: jax.Array, generated: jax.Array, batch: dict[str, jax.Array], seq_len: int
             ) -> dict[str, jax.Array]:
  """A train batch from generated sequences.

  Args:
    tokens: ``[B, T]`` prompt + generated tokens (``T <= seq_len``).
    generated: ``[B, T]`` bool, True at generated tokens.
    batch: the data batch it replaces (``index``, ``mask`` and any other keys are kept).
    seq_len: ``L``, the data's tokens per sequence.

  Returns:
    ``batch`` with ``tokens``/``targets`` int32 ``[B, L]`` (EOD-padded) and ``token_mask``
    float32 ``[B, L]``, 1 where the target is a generated token.
  """
  pad = ((0, 0), (0, seq_len + 1 - tokens.shape[1]))
  full = jnp.pad(tokens.astype(jnp.int32), pad, constant_values=PAD)
  gen = jnp.pad(generated, pad)
  return {**batch, "tokens": full[:, :seq_len], "targets": full[:, 1:],
          "token_mask": gen[:, 1:].astype(jnp.float32)}


def rollout_key(seed: jax.Array, step: jax.Array) -> jax.Array:
  """The sampling key of ``step`` in the run of ``seed``."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SALT), step)


def example_rows(tokens: jax.Array, generated: jax.Array, *, seq_len: int, stop_ids: Sequence[int], pad_id: int
                 ) -> dict[str, jax.Array]:
  """Rows of one example each from sampled replies (instruction data; the module doc's table).

  Args:
    tokens: ``[B, T]`` prompt, sampled tokens, padding (:func:`kdlab.sampling.generate`'s layout,
      ``T <= seq_len``).
    generated: ``[B, T]`` bool, True at the sampled tokens (at least one per row).
    seq_len: ``L``.
    stop_ids: a reply ends at the first of these it samples (kept); what follows becomes padding.
    pad_id: written on padding (tokens and targets).

  Returns:
    ``tokens``, ``targets``, ``segment_ids``, ``positions`` int32 and ``token_mask`` float32, all
    ``[B, L]``: the mask is 1 where the target is a sampled token up to and including the stop token.
  """
  stop = generated & jnp.isin(tokens, jnp.asarray(stop_ids, tokens.dtype))
  reply = generated & (jnp.cumsum(stop, axis=1) - stop == 0)  # up to the first stop token
  real = (jnp.cumsum(generated, axis=1) == 0) | reply  # the prompt (before the first sampled token) and the reply
  pad = ((0, 0), (0, seq_len + 1 - tokens.shape[1]))
  full = jnp.pad(jnp.where(real, tokens, pad_id).astype(jnp.int32), pad, constant_values=pad_id)
  real, reply = jnp.pad(real, pad), jnp.pad(reply, pad)
  positions = jnp.where(real, jnp.arange(seq_len + 1, dtype=jnp.int32), 0)
  return {"tokens": full[:, :seq_len], "targets": full[:, 1:], "token_mask": reply[:, 1:].astype(jnp.float32),
          "segment_ids": real[:, :seq_len].astype(jnp.int32), "positions": positions[:, :seq_len]}


def batch_prompts(batch: dict[str, jax.Array], table: Sequence[jax.Array], key: jax.Array, *, spec: OnPolicy
                  ) -> tuple[jax.Array, jax.Array]:
  """Each batch row's prompt (instruction data): one of the row's examples, drawn with ``key``.

  ``table`` is :meth:`kdlab.data.prompts.Prompts.row_table` (``start``, ``length`` ``[N, K]``, ``count``
  ``[N]``) of the split; ``batch["index"]`` names the rows. Returns ``(prompts [B, prompt_len]``
  right-padded with ``pad_id``, ``lengths [B])``.
  """
  starts, lengths, counts = table
  rows = batch["index"]
  pick = jax.random.randint(jax.random.fold_in(key, CHOICE), rows.shape, 0, counts[rows])
  start, length = starts[rows, pick], lengths[rows, pick]
  cols = jnp.arange(spec.prompt_len)
  take = jnp.minimum(start[:, None] + cols, batch["tokens"].shape[1] - 1)
  prompts = jnp.take_along_axis(batch["tokens"], take, axis=1)
  return jnp.where(cols < length[:, None], prompts, spec.pad_id).astype(jnp.int32), length


def rollout(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: dict[str, jax.Array], key: jax.Array, *,
            spec: OnPolicy, table: Sequence[jax.Array] | None = None) -> dict[str, jax.Array]:
  """The on-policy version of ``batch``: the student continues each row's prompt.

  Text (``spec.examples`` False): the first ``P`` tokens of each sequence, shapes as :func:`as_batch`.
  Instruction data: a prompt of each row's examples (:func:`batch_prompts`, ``table`` required),
  the rows of :func:`example_rows` (``segment_ids`` / ``positions`` replace the data's when it has them).
  ``graphdef``, ``params``, ``rest`` are the learner's (``state.params``, ``state.rest``; its
  ``student`` generates, in eval mode, with no gradient). Traceable (jit it with ``graphdef`` and
  ``spec`` static, or call it inside a jitted function).
  """
  student = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest).student
  if not spec.examples:
    out = generate(student, batch["tokens"][:, :spec.prompt_len], max_new_tokens=spec.max_new_tokens,
                   temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, key=key)
    return as_batch(jax.lax.stop_gradient(out.tokens), out.mask, batch, spec.seq_len)
  prompts, lengths = batch_prompts(batch, table, key, spec=spec)
  out = generate(student, prompts, prompt_lengths=lengths, max_new_tokens=spec.max_new_tokens,
                 temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, key=key, pad_id=spec.pad_id)
  rows = example_rows(jax.lax.stop_gradient(out.tokens), out.mask, seq_len=spec.seq_len, stop_ids=spec.stop_ids,
                      pad_id=spec.pad_id)
  keep = ("tokens", "targets", "token_mask", *(k for k in ("segment_ids", "positions") if k in batch))
  return {**batch, **{k: rows[k] for k in keep}}


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
  """The per-step Bernoulli(``fraction``) draw of the run of ``seed`` (deterministic in ``(seed, step)``)."""
  if fraction <= 0.0:
    return False
  if fraction >= 1.0:
    return True
  return bool(np.random.default_rng([SALT, int(seed) & 0xFFFFFFFF, int(step)]).random() < fraction)


class Runner:
  """Wraps the jitted train step: replaces the batch by a rollout on on-policy steps and adds metrics.

  ``seeds``: the run's seed, or the seeds of a vmapped group (then every array has a leading seed
  axis; the group generates when any seed's draw is on-policy and the others keep their data
  batch, so each seed sees what its own run would).
  """

  def __init__(self, spec: OnPolicy, graphdef: nnx.GraphDef, seeds: Sequence[int], batch_sharding: Any,
               table: Sequence[np.ndarray] | None = None):
    self.spec, self.seeds = spec, [int(s) for s in seeds]
    stacked = len(self.seeds) > 1
    fn = functools.partial(rollout, graphdef, spec=spec)
    # Instruction data: the rows' prompt table, on every device (a few int32 per packed row).
    mesh = getattr(batch_sharding, "mesh", None)
    place = (lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P()))) if mesh is not None \
        else jnp.asarray
    self._table = None if table is None else tuple(place(np.asarray(t, np.int32)) for t in table)

    def run(params, rest, batch, seeds, step, on, table):
      if stacked:
        new = jax.vmap(lambda p, r, b, s: fn(p, r, b, rollout_key(s, step), table=table))(params, rest, batch, seeds)
        return {k: jnp.where(on.reshape(-1, *[1] * (v.ndim - 1)), v, batch[k]) for k, v in new.items()}
      return fn(params, rest, batch, rollout_key(seeds, step), table=table)

    self._rollout = jax.jit(run, out_shardings=batch_sharding)
    self._first = True

  def wrap(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
    """``train_step(state, teacher_vars, batch)`` -> the same signature, on-policy where drawn.

    The first call runs the rollout (when ``fraction > 0``) whatever its draw, so its compilation
    stays in the first step, which the loop's speed figure and ``time/generate_fraction`` leave out.
    """

    def step(state: Any, teacher_vars: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, Any]]:
      n = len(self.seeds)
      first, self._first = self._first, False
      index = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # this step's number - 1
      on = np.array([is_on_policy(s, index, self.spec.fraction) for s in self.seeds])
      args = (state.params, state.rest, batch, jnp.asarray(self.seeds if n > 1 else self.seeds[0], jnp.int32),
              jnp.int32(index), jnp.asarray(on), self._table)
      warm = self._rollout(*args) if first and self.spec.fraction > 0 and not on.any() else None
      if warm is not None:
        jax.block_until_ready(warm)  # compiled now; the samples are not used (a pure function of the inputs)
      start = time.perf_counter()
      generated = 0.0
      if on.any():
        batch = self._rollout(*args)
        jax.block_until_ready(batch["tokens"])
        generated = time.perf_counter() - start
      state, metrics = train_step(state, teacher_vars, batch)
      jax.block_until_ready(metrics)
      total = time.perf_counter() - start
      shape = (n,) if n > 1 else ()
      metrics = dict(metrics)
      metrics["on_policy/fraction"] = (on.astype(np.float32).reshape(shape), np.ones(shape, np.float32))
      if not first:  # the first step compiles the train step (and the rollout)
        metrics["time/generate_fraction"] = (np.full(shape, generated, np.float32), np.full(shape, total, np.float32))
      return state, metrics

    return step


def build(configs: Sequence[Any], setup: Any, graphdef: nnx.GraphDef, batch_sharding: Any) -> Runner | None:
  """The :class:`Runner` of a (group of) run(s), or None when ``config.on_policy`` is off."""
  if not configs[0].get("on_policy"):
    return None
  examples = promptlib.has_examples(setup.train_source)
  spec = parse(configs[0], max_len=setup.student_kwargs.get("max_len"), seq_len=int(configs[0].data.seq_len),
               examples=examples)
  if spec is None:
    return None
  table = None
  if examples:
    spec, found = example_spec(configs[0], setup.train_source, spec)
    table = found.row_table(len(setup.train_source))
  return Runner(spec, graphdef, [c.seed for c in configs], batch_sharding, table)


# --- the sample-quality measure ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _sample_nll(graphdef, state, teacher_graphdef, teacher_state, prompts, keys, *, max_new_tokens, temperature,
                top_k, top_p):
  """Per row: (teacher NLL sum, student NLL sum, generated tokens) ``[B]`` each."""
  student = nnx.merge(graphdef, state)
  teacher = nnx.merge(teacher_graphdef, teacher_state)
  out = generate(student, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, key=keys)
  targets, weights = out.tokens[:, 1:], out.mask[:, 1:].astype(jnp.float32)

  def nll(model):
    logits = model(out.tokens, train=False)[0][:, :-1].astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

  return jnp.sum(nll(teacher) * weights, -1), jnp.sum(nll(student) * weights, -1), jnp.sum(weights, -1)


def teacher_nll_of_samples(student: nnx.Module, teacher: nnx.Module, prompts: Any, *, max_new_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           key: Any = None, batch_size: int = 64) -> dict[str, float]:
  """The teacher's per-token NLL of the student's own continuations of ``prompts``.

  The student samples ``max_new_tokens`` tokens after each prompt (``prompts [N, P]``, all of
  length ``P``; row ``i`` draws with ``fold_in(key, i)``, so the tokens do not depend on
  ``batch_size``); the teacher scores them. Lower is better: the student writes what the teacher
  finds likely (the quality measure of GKD / MiniLLM, with the teacher as the judge).

  Returns:
    ``teacher_nll`` (nats per generated token, under the teacher), ``student_nll`` (the same
    tokens under the student: an estimate of its per-token entropy) and ``tokens`` (scored).
  """
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or len(prompts) == 0:
    raise UserError(f"prompts: expected [N, P] token ids with N >= 1, got shape {prompts.shape}")
  if not _int(batch_size) or batch_size < 1:
    raise UserError(f"batch_size={batch_size!r}: must be an int >= 1")
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(student)
  t_graphdef, t_state = nnx.split(teacher)
  totals = np.zeros(3)
  for start in range(0, len(prompts), batch_size):
    rows = np.arange(start, min(start + batch_size, len(prompts)))
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # one compiled batch size
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(padded))
    sums = _sample_nll(graphdef, state, t_graphdef, t_state, prompts[padded], keys,
                       max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                       top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p))
    totals += np.array([np.asarray(x, np.float64)[: len(rows)].sum() for x in sums])
  return {"teacher_nll": float(totals[0] / totals[2]), "student_nll": float(totals[1] / totals[2]),
          "tokens": int(totals[2])}
