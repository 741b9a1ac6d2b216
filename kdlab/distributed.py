"""Several kdlab processes in one global mesh: start-up, agreement between processes, the one writer.

A multi-host run is one ``kdlab train`` per host, all with the same command, joined by JAX's
multi-controller runtime (``jax.distributed``). :func:`initialize` joins them (on CPU over gloo
collectives). When a process dies, the runtime notices within ``timeout_s`` seconds (missed
heartbeats, or the coordinator's socket closing) and aborts every other process with a C++ stack
trace; :mod:`kdlab.stderr_filter`, which every process's stderr goes through, turns that into one
``kdlab: error:`` line saying what happened and how to resume.

Single-process runs never call :func:`initialize`; every function here then answers for one process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import subprocess
from typing import Any

import jax

from kdlab import stderr_filter
from kdlab.errors import UserError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
DEFAULT_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others: explicitly (address, count, id) or, with ``auto``, as JAX detects
  it (TPU pods, SLURM, Open MPI). ``timeout_s``: how long a silent process is waited for."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  timeout_s: float = DEFAULT_TIMEOUT_S


def cluster_from(coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, auto: bool = False, timeout_s: float | None = None,
                 environ: dict[str, str] | None = None) -> Cluster | None:
  """The :class:`Cluster` that flags (``--coordinator_address`` ...) or else ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` describe; None for a single-process run."""
  environ = os.environ if environ is None else environ
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  for name, var in ENV.items():
    if given[name] is None and environ.get(var):
      value = environ[var]
      if name != "coordinator_address":
        if not value.strip().isdigit():
          raise UserError(f"{var}={value!r}: not a whole number; set it to this process's "
                          f"{'count of processes' if name == 'num_processes' else 'index'}")
        value = int(value)
      given[name] = value
  timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
  if not timeout > 0:
    raise UserError(f"--distributed_timeout={timeout_s}: use a number of seconds > 0")
  if auto:
    return Cluster(auto=True, timeout_s=float(timeout), **given)
  if all(v is None for v in given.values()):
    return None
  missing = [f"--{name}" for name, v in given.items() if v is None]
  if missing:
    raise UserError(f"{', '.join(missing)}: missing; a multi-process run needs --coordinator_address=HOST:PORT, "
                    f"--num_processes=N and --process_id=I on every process (or --distributed where JAX "
                    f"detects the cluster)")
  address, n, i = given["coordinator_address"], given["num_processes"], given["process_id"]
  host, _, port = str(address).rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address={address!r}: not HOST:PORT; give process 0's host and a free port, "
                    f"e.g. 10.0.0.1:12355")
  if n < 1:
    raise UserError(f"--num_processes={n}: use a count >= 1")
  if not 0 <= i < n:
    raise UserError(f"--process_id={i}: not in 0..{n - 1}; number the processes 0 to --num_processes - 1")
  return Cluster(str(address), int(n), int(i), timeout_s=float(timeout))


def initialize(cluster: Cluster) -> None:
  """Joins the processes of ``cluster`` (``jax.distributed.initialize``), stderr through the filter.

  Call it before anything touches a device. A process that cannot reach the others within
  ``cluster.timeout_s`` raises a ``UserError``.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _TIMEOUT["s"] = cluster.timeout_s
  if not cluster.auto and cluster.num_processes and cluster.num_processes > 1:
    _filter_stderr(cluster.process_id or 0, cluster.num_processes)
  kwargs: dict[str, Any] = dict(initialization_timeout=int(max(cluster.timeout_s, 1)),
                                heartbeat_timeout_seconds=int(max(cluster.timeout_s, 1)))
  if not cluster.auto:
    kwargs.update(coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
                  process_id=cluster.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 -- the runtime's errors are C++ statuses of many kinds.
    where = "the cluster JAX detected" if cluster.auto else f"coordinator {cluster.coordinator_address}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"distributed: could not join {where} within {cluster.timeout_s:g} s ({first}); start every "
                    f"process with the same --coordinator_address and --num_processes, or raise "
                    f"--distributed_timeout") from None
  if cluster.auto and jax.process_count() > 1:
    _filter_stderr(jax.process_index(), jax.process_count())


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_writer() -> bool:
  """Whether this process writes the run's files (``config.json``, logs, summaries): process 0 only."""
  return jax.process_index() == 0


def agree(error: UserError | None, what: str = "validation") -> None:
  """Raises, on every process, the ``UserError`` of the lowest-numbered process that has one.

  Each process checks its input, then all meet here before anything is written: bad input stops
  every process with the same line, and none starts writing while another refuses.
  """
  if jax.process_count() == 1 or (error is not None and _PASSED.get(what)):
    if error is not None:  # Past the meeting point an error is this process's alone.
      raise error
    return
  client = _client()
  key = f"kdlab/agree/{what}/{_round(what)}"
  client.key_value_set(f"{key}/{jax.process_index()}", "" if error is None else f"!{error}")
  timeout_ms = int(_TIMEOUT['s'] * 1000)
  answers = [client.blocking_key_value_get(f"{key}/{i}", timeout_ms) for i in range(jax.process_count())]
  _PASSED[what] = True  # Met: an error raised from here on (this one included) is not met over again.
  for answer in answers:
    if answer.startswith("!"):
      raise UserError(answer[1:])


def gather(value: str, what: str) -> list[str]:
  """Every process's ``value`` (a string), in process order: e.g. each one's data iterator position."""
  if jax.process_count() == 1:
    return [value]
  client = _client()
  key = f"kdlab/gather/{what}/{_round('gather/' + what)}"
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  timeout_ms = int(_TIMEOUT["s"] * 1000)
  return [client.blocking_key_value_get(f"{key}/{i}", timeout_ms) for i in range(jax.process_count())]


def all_true(flag: bool, what: str) -> bool:
  """Whether ``flag`` holds on every process (e.g. a checkpoint loaded everywhere)."""
  return all(v == "1" for v in gather("1" if flag else "0", what))


def first_signal(code: int | None) -> int | None:
  """The signal number any process received (the lowest), or None: processes stop at the same step.

  Exchanged through the runtime's key-value store, not a device collective: a host collective
  between the steps' own collectives can pair up with the wrong one in gloo.
  """
  if jax.process_count() == 1:
    return code
  client, me = _client(), jax.process_index()
  n = _round("signal")
  client.key_value_set(f"kdlab/signal/{n}/{me}", str(code or 0))
  if n > 2:  # Every process has read round n - 2 (it set round n - 1 after), so its keys can go.
    client.key_value_delete(f"kdlab/signal/{n - 2}/{me}")
  timeout_ms = int(_TIMEOUT["s"] * 1000)
  codes = [int(client.blocking_key_value_get(f"kdlab/signal/{n}/{i}", timeout_ms)) for i in range(jax.process_count())]
  received = [c for c in codes if c]
  return min(received) if received else None


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (no-op for one process)."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"kdlab/{name}/{_round(name)}", int(_TIMEOUT['s'] * 1000))


def set_failure_hint(hint: str) -> None:
  """What the one-line error after a lost process tells the user to do (e.g. where the run resumes from)."""
  if _FILTER.get("on"):
    os.write(2, f"{stderr_filter.HINT_MARK}{hint}\n".encode())


_ROUNDS: dict[str, int] = {}
_PASSED: dict[str, bool] = {}
_FILTER: dict[str, bool] = {}
_TIMEOUT: dict[str, float] = {"s": DEFAULT_TIMEOUT_S}


def _round(name: str) -> int:
  """How many times this process has met at ``name``: the same count on every process, so keys never clash."""
  _ROUNDS[name] = _ROUNDS.get(name, 0) + 1
  return _ROUNDS[name]


def _client() -> Any:
  from jax._src import distributed as jax_distributed  # The runtime's key-value store has no public handle.
  return jax_distributed.global_state.client


def _filter_stderr(process: int, count: int) -> None:
  """Routes this process's stderr through :mod:`kdlab.stderr_filter`, which turns the runtime's abort
  (a C++ stack trace when a peer is lost) into one ``kdlab: error:`` line."""
  read, write = os.pipe()
  original = os.dup(2)
  subprocess.Popen([sys.executable, "-m", "kdlab.stderr_filter", str(process), str(count)], stdin=read,
                   stdout=original, stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
  os.close(read)
  os.close(original)
  sys.stderr.flush()
  os.dup2(write, 2)
  os.close(write)
  _FILTER["on"] = True
