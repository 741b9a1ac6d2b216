"""Benchmark workers: one process per framework or variant, driven over stdin/stdout JSON lines.

Each side of a side-by-side benchmark runs in its own process (its own interpreter or virtual
environment, threads and ``XLA_FLAGS``), so the driver can make them take turns round by round and
a change in the machine's load hits them alike. A request is one JSON object per stdin line
(``{"op": ..., ...}``); the reply is one JSON object per stdout line. Workers print everything else
to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable


class Worker:
  """A subprocess answering JSON requests (``request(op=..., **fields) -> dict``)."""

  def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
    self.cmd = cmd
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=None if env is None else {**os.environ, **env})

  def request(self, **req: Any) -> dict:
    assert self.proc.stdin is not None and self.proc.stdout is not None
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker {' '.join(self.cmd)} exited with code {self.proc.wait()}")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"benchmark worker {' '.join(self.cmd)}: {reply['error']}")
    return reply

  def times(self, op: str, n: int, warmup: int = 0) -> list[float]:
    return self.request(op=op, n=n, warmup=warmup)["times"]

  def close(self) -> None:
    if self.proc.stdin is not None:
      self.proc.stdin.close()
    self.proc.wait()


def timed(run: Callable[[], Any], n: int, warmup: int = 0) -> list[float]:
  """Seconds of each of ``n`` calls of ``run`` (which must block until its work is done), after
  ``warmup`` untimed calls."""
  for _ in range(warmup):
    run()
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    run()
    out.append(time.perf_counter() - t0)
  return out


def maxrss_mib() -> float:
  """Peak resident memory of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(answer: Callable[[dict], dict]) -> None:
  """The worker loop: ``answer(request) -> reply`` for each stdin line; an exception becomes
  ``{"error": "..."}`` (the driver raises it) and the loop goes on."""
  for line in sys.stdin:
    req = json.loads(line)
    try:
      reply = answer(req)
    except Exception as e:  # noqa: BLE001 -- reported to the driver, which stops
      reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def peer_worker(bench: Any, info: Callable[[], dict], serve_requests: bool) -> None:
  """A peer framework's worker loop over ``bench`` (``loss_at_init()``, ``timed(op, n, warmup)``):
  answers ``info`` / ``loss_at_init`` / timing requests with the framework's own prints sent to stderr
  (stdout carries only the replies); without ``serve_requests``, prints the loss at init and two kd
  steps once (a check by hand)."""

  def answer(req: dict) -> dict:
    with contextlib.redirect_stdout(sys.stderr):
      op = req["op"]
      if op == "info":
        return info()
      if op == "loss_at_init":
        return bench.loss_at_init()
      return bench.timed(op, int(req.get("n", 1)), int(req.get("warmup", 0)))

  if serve_requests:
    serve(answer)
  else:
    print(json.dumps({**answer({"op": "loss_at_init"}), **answer({"op": "kd", "n": 2, "warmup": 1})}))
