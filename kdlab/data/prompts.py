"""The prompts of instruction examples, for sampling replies (on-policy distillation, ``kdlab generate-data``).

Sources whose rows are packed examples (:class:`kdlab.data.packing.PackedRows`: the ``jsonl:`` /
``parquet:`` sources of :mod:`kdlab.data.instruct`, and datasets ``kdlab generate-data`` built from
them) are sampled after each example's **prompt**: its tokens before the first counted token of its
last assistant turn (the last run of loss targets in the example). For a chat that is the chat
template applied to the conversation up to its last assistant message, ending with the assistant's
role header: what ``apply_chat_template(messages[:-1], add_generation_prompt=True)`` renders for the
usual templates (ChatML, Llama 3, Gemma; a template whose ``{% generation %}`` block also wraps the
newline after the header leaves that newline to the sampler). A ``prompt``/``completion`` record's
prompt is its chat (or ``[bos] prompt``) before the completion. With ``config.data.loss_mask =
"last_turn"`` or ``"completion"`` the prompt is the same; ``"all"`` counts every token and leaves no
prompt (refused), and so do ``text`` records (refused, naming the record).

A prompt is a prefix of its example's tokens in the packed row, so a batch's prompts are gathered
from the batch itself: :class:`Prompts` holds where each example's prompt lies (``example_row``,
``example_start``, ``length``), nothing else. Sampled tokens stop at :func:`stop_tokens` (the
tokenizer's EOS and the chat template's end-of-turn token); rows are padded with the data's pad id
(the tokenizer's pad token, else its EOS), never with byte 0 unless the tokenizer is bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kdlab.data import instruct, text
from kdlab.errors import UserError

PROBE = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})  # renders one assistant turn


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Where each example's prompt lies in its packed row.

  Attributes:
    example_row, example_start, length: int32 ``[E]``: example ``e``'s prompt is
      ``tokens[example_row[e], example_start[e]:example_start[e] + length[e]]``, ``length >= 1``.
    where: the examples' names (``FILE:LINE``, or ``SOURCE row N`` for a generated dataset).
  """
  example_row: np.ndarray
  example_start: np.ndarray
  length: np.ndarray
  where: tuple[str, ...]

  @property
  def width(self) -> int:
    """The longest prompt's length: the prompts' padded width."""
    return int(self.length.max())

  def tokens(self, row_tokens: np.ndarray, pad_id: int) -> np.ndarray:
    """int32 ``[E, width]``: every prompt, right-padded with ``pad_id``, from the rows ``row_tokens [N, L]``."""
    cols = np.arange(self.width)
    take = np.minimum(self.example_start[:, None] + cols, row_tokens.shape[1] - 1)
    out = np.asarray(row_tokens)[self.example_row[:, None], take]
    return np.where(cols < self.length[:, None], out, pad_id).astype(np.int32)

  def row_table(self, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per packed row, its examples' prompts: ``(start [N, K], length [N, K], count [N])`` int32,
    ``K`` the most examples in a row (unused slots repeat the row's first example)."""
    count = np.bincount(self.example_row, minlength=num_rows).astype(np.int32)
    k = max(1, int(count.max()))
    order = np.lexsort((self.example_start, self.example_row))  # by row, then along the row
    rank = np.arange(len(order)) - np.searchsorted(self.example_row[order], self.example_row[order])
    start = np.zeros((num_rows, k), np.int32)
    length = np.ones((num_rows, k), np.int32)
    start[self.example_row[order], rank] = self.example_start[order]
    length[self.example_row[order], rank] = self.length[order]
    unused = np.arange(k)[None, :] >= count[:, None]
    return np.where(unused, start[:, :1], start), np.where(unused, length[:, :1], length), np.maximum(count, 1)


def has_examples(source: Any) -> bool:
  """Whether ``source``'s rows are packed examples (they carry segment ids)."""
  return getattr(getattr(source, "records", None), "segment_ids", None) is not None


def find(source: Any, *, max_new_tokens: int, field: str, loss_mask: str = "completion") -> Prompts:
  """The prompts of every example of ``source`` (a split whose rows are packed examples; module doc).

  Args:
    source: an :class:`kdlab.data.instruct.InstructSource` or a generated dataset built from one.
    max_new_tokens: ``N``, tokens sampled after each prompt; every prompt must leave them room in
      ``seq_len`` (``length + N <= L``).
    field: the sampling settings' name for messages (``config.on_policy``, ``config.generate_data``).
    loss_mask: ``config.data.loss_mask`` of an instruction source.

  Raises:
    UserError: one line naming the first bad record: a ``text`` record (no prompt), an example
      without counted tokens, or a prompt leaving fewer than ``N`` tokens; ``loss_mask="all"``.
  """
  records = source.records
  examples = getattr(source, "examples", ())
  if loss_mask == "all":
    raise UserError(f"config.data.loss_mask='all': every token is a target, so no example has a prompt to sample "
                    f"{field} replies after; use 'completion' or 'last_turn'")
  num = len(records.example_row)
  where = tuple(r.where for r in examples) if len(examples) == num else tuple(
      f"{source.name} row {int(r)}" for r in records.example_row)
  for record in examples:
    if record.kind == "text":
      raise UserError(f"{record.where}: a text record has no prompt to sample {field} replies after; use messages "
                      f"or prompt/completion records (or a text source with prompt_len)")
  seq_len = records.tokens.shape[1]
  counted = records.mask > 0
  before = np.zeros_like(counted)
  before[:, 1:] = counted[:, :-1]
  rows, cols = np.nonzero(counted & ~before)  # where each run of targets starts (runs never cross examples)
  row_of, start_of = records.example_row.astype(np.int64), records.example_start.astype(np.int64)
  key = row_of * (seq_len + 1) + records.segment_ids[row_of, start_of]
  order = np.argsort(key, kind="stable")
  owner = order[np.searchsorted(key[order], rows.astype(np.int64) * (seq_len + 1) + records.segment_ids[rows, cols])]
  last = np.full(num, -1, np.int64)
  np.maximum.at(last, owner, cols)
  # mask[t] counts token t + 1: the last run's first counted token is last + 1, the prompt the tokens before it.
  length = np.where(last >= 0, last + 1 - start_of, 0).astype(np.int32)
  bad = np.flatnonzero(length < 1)
  if len(bad):
    raise UserError(f"{where[bad[0]]}: no counted token within config.data.seq_len={seq_len}, so no prompt to sample "
                    f"{field} replies after; raise config.data.seq_len or drop the record")
  long = np.flatnonzero(length + max_new_tokens > seq_len)
  if len(long):
    e = int(long[0])
    raise UserError(f"{where[e]}: its prompt is {int(length[e])} tokens, which leaves fewer than {field}."
                    f"max_new_tokens={max_new_tokens} of config.data.seq_len={seq_len} to sample ({len(long)} such "
                    f"record(s)); lower {field}.max_new_tokens, raise config.data.seq_len or drop the long records")
  return Prompts(example_row=row_of.astype(np.int32), example_start=start_of.astype(np.int32), length=length,
                 where=where)


def stop_tokens(data_cfg: Any) -> tuple[tuple[int, ...], int]:
  """``(stop_ids, pad_id)`` of ``config.data``'s tokenizer and chat template.

  ``stop_ids``: the EOS and the token that closes an assistant turn in the chat template (found by
  rendering a one-turn chat, as :class:`kdlab.data.instruct.Encoder` ends examples: ``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ...); ``pad_id``: the tokenizer's pad token, else its EOS (the
  data's own padding). The byte tokenizer: ``((EOD,), EOD)``.
  """
  spec = data_cfg.get("tokenizer") or "byte"
  try:
    tok = text.tokenizer_for(spec)
  except ValueError as e:
    raise UserError(f"config.data.{e}") from None
  template = data_cfg.get("chat_template", None)
  encoder = instruct.Encoder(tok, f"config.data.tokenizer={spec!r}", "completion", template)
  stops = [encoder.eos]
  if encoder.is_hf and tok.templates and template is not False:
    try:
      ids, counted = encoder.encode(instruct.Record("(a one-turn probe chat)", messages=PROBE))
      stops.append(int(ids[np.flatnonzero(counted)[-1]]))
    except UserError:  # a template that cannot render the probe: the EOS alone ends replies
      pass
  pad = tok.pad_id if encoder.is_hf and tok.pad_id is not None else encoder.eos
  return tuple(sorted(set(int(s) for s in stops))), int(pad)
