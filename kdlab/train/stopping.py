"""How a run stops early, and the one line it leaves: a signal (:class:`Interrupted`) or divergence (:class:`Diverged`).

While a run writes its workdir, SIGINT and SIGTERM only set a flag (:class:`Deferred`); the loop
reads it after each step, saves a checkpoint there (after any save in flight, never cutting one
short) and raises :class:`Interrupted`, which ``kdlab`` prints as one line before exiting with
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second SIGINT exits at once
(``os._exit``): orbax writes a checkpoint into a temporary folder and renames it when complete, so
an abandoned save leaves the previous checkpoint the latest. Elsewhere (start-up, between the
generations of a chain, a sweep's parent) nothing is being written and a signal stops the command
at once (:func:`raising`), with the same one line. No JAX here: the CLI imports this module before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import types
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class Interrupted(BaseException):
  """A command stopped by signal ``signum``; ``str(e)`` is the line the CLI prints after ``kdlab: ``.

  A ``BaseException`` as ``KeyboardInterrupt`` is: code that catches ``Exception`` to go on (a
  sweep's failed runs) lets it through.
  """

  def __init__(self, signum: int, message: str | None = None):
    self.signum = signum
    super().__init__(message or f"interrupted ({signal_name(signum)}); rerun the same command to resume")

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


class Diverged(FloatingPointError):
  """The loss or the train state stopped being finite, or the loss passed ``config.train.max_loss``.

  Not bad input (the CLI exits with status 1, not 2); the message names the step, the last good
  checkpoint and the options that help. A ``FloatingPointError``, as a nan loss raised before.
  """


class Deferred:
  """``with Deferred() as signals:`` SIGINT and SIGTERM set ``signals.received`` (the first one's number)
  and nothing else, so no write is cut short; the code inside polls it. A SIGINT after the first
  signal exits at once with status 130; a SIGTERM after it is ignored (the save it waits for goes on).
  The previous handlers come back on exit. Outside the main thread, where Python cannot set
  handlers, signals keep their previous handling.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Deferred:
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    except ValueError:  # Not the main thread.
      self._previous = {}
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.received is None:
      self.received = signum
    elif signum == signal.SIGINT:
      # Only a raw write is safe here: the main thread may be inside a write to sys.stderr.
      os.write(2, b"kdlab: interrupted again (SIGINT); exiting now without the checkpoint being written; "
                  b"the previous checkpoint is intact; rerun the same command to resume\n")
      os._exit(128 + signal.SIGINT)


def _raise(signum: int, frame: types.FrameType | None) -> None:
  del frame
  raise Interrupted(signum)


@contextlib.contextmanager
def raising() -> Iterator[None]:
  """SIGINT and SIGTERM raise :class:`Interrupted` at once (the CLI's handling outside a run's writes);
  the previous handlers come back on exit. A ``KeyboardInterrupt`` raised by code (not by a signal)
  stays one."""
  try:
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
  except ValueError:  # Not the main thread.
    previous = {}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)


# Disk full, as the OS (errno 28, ENOSPC; 122, EDQUOT) or tensorstore (its RESOURCE_EXHAUSTED status) says it.
_FULL_ERRNOS = (28, 122)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_full(e: BaseException) -> str | None:
  """If ``e`` (or an exception it came from) is a write that found the disk full: the path it names (or
  ``""``); else None."""
  import re
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    if (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(t in text for t in _FULL_TEXT):
      path = getattr(e, "filename", None) or next(iter(re.findall(r'local file "([^"]+)"', text)), "")
      return str(path)
    e = e.__cause__ or e.__context__
  return None


def disk_full_line(path: str) -> str:
  """The one line for a full disk (``kdlab: error: `` is the CLI's)."""
  where = f" writing {path}" if path else ""
  return (f"no space left on the device{where}; free space there (or give another --workdir / --out) and rerun "
          f"the same command: a run resumes from its last complete checkpoint, files written atomically are "
          f"whole, a temporary checkpoint folder is ignored")
