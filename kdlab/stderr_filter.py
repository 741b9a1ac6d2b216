"""``python -m kdlab.stderr_filter PROCESS COUNT``: a multi-process run's stderr, with the runtime's abort as one line.

When a process of a multi-process run dies, JAX's distributed runtime ends the others with a
fatal log line and a C++ stack trace. Each process's stderr is piped through this filter
(:func:`kdlab.distributed.initialize` starts it): lines pass through after :data:`HOLD_S`
seconds, so the runtime's last log lines before a fatal one are still here to be dropped; on
the fatal line the filter prints ``kdlab: error: distributed: ...`` (which process was lost, what
to do) and drops the rest. A line starting with :data:`HINT_MARK` sets what to do and is not shown.
It imports nothing heavy: it must start in milliseconds.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time

HINT_MARK = "\x1bkdlab-hint:"
HOLD_S = 1.0
FATAL = (b"Terminating process because the JAX distributed service detected fatal errors",
         b"*** Check failure stack trace", b"terminate called after throwing an instance of 'gloo::")
GLOO = re.compile(rb"terminate called after throwing an instance of 'gloo::(\w+)'")
RUNTIME_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d")
UNHEALTHY = b"The following tasks are unhealthy"
DEFAULT_HINT = "restart every process with the same command to resume from the last complete checkpoint"


def error_line(lines: list[bytes], process: int, count: int, hint: str) -> str:
  """The one line for a runtime abort whose log ``lines`` (the held ones and the fatal one) say why."""
  text = b"".join(lines)
  lost = None
  if UNHEALTHY in text:
    after = text.split(UNHEALTHY, 1)[1].split(b"\n", 2)
    ids = re.findall(rb"\d+", after[1] if len(after) > 1 else b"")
    if ids:
      lost = f"process {', '.join(i.decode() for i in ids)} of {count} stopped sending heartbeats (it died or hung)"
  if lost is None and process != 0 and re.search(rb"Socket closed|Connection refused|UNAVAILABLE", text):
    lost = "lost the coordinator (process 0): it died or its host became unreachable"
  gloo = GLOO.search(text)
  if lost is None and gloo:
    lost = (f"a collective between the processes failed (gloo::{gloo.group(1).decode()}): another process "
            f"died or stopped mid-step")
  if lost is None:
    lost = "the distributed runtime reported that another process of this run died"
  return f"kdlab: error: distributed: {lost}; this process (process {process}) stops too; {hint}\n"


def run(source: int, sink: int, process: int, count: int) -> None:
  """Copies ``source`` to ``sink`` line by line (``\\n`` or ``\\r`` ends one), each after :data:`HOLD_S`."""
  held: list[tuple[float, bytes]] = []
  partial = b""
  hint = DEFAULT_HINT
  fatal = False
  while True:
    wait = max(0.0, held[0][0] + HOLD_S - time.monotonic()) if held else None
    ready, _, _ = select.select([source], [], [], wait)
    chunk = os.read(source, 65536) if ready else None
    if chunk:
      partial += chunk
      pieces = re.split(rb"(?<=[\n\r])", partial)
      partial = pieces.pop()
      now = time.monotonic()
      for line in pieces:
        if line.startswith(HINT_MARK.encode()):
          hint = line[len(HINT_MARK):].decode(errors="replace").strip() or hint
        elif not fatal:
          held.append((now, line))
      if not fatal and any(marker in line for _, line in held for marker in FATAL):
        fatal = True
        first = next((i for i, (_, line) in enumerate(held) if RUNTIME_LINE.match(line)), len(held))
        for _, line in held[:first]:
          os.write(sink, line)
        os.write(sink, error_line([line for _, line in held[first:]], process, count, hint).encode())
        held = []
    now = time.monotonic()
    while held and (chunk == b"" or held[0][0] + HOLD_S <= now):
      os.write(sink, held.pop(0)[1])
    if chunk == b"":  # The process exited.
      if partial and not fatal:
        os.write(sink, partial)
      return


if __name__ == "__main__":
  run(0, 1, int(sys.argv[1]), int(sys.argv[2]))
