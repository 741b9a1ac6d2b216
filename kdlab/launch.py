"""A sweep's runs as cluster jobs through ``submitit``: a SLURM job array, one array task per run.

``kdlab sweep --launcher=slurm`` submits the unfinished runs as one job array; a run that asks for
several nodes is a multi-host run (one process per node, joined by :func:`kdlab.distributed.initialize`
with node 0 as coordinator). ``--launcher=submitit-local`` is the same path on this machine
(submitit's local executor: a node is a local process), which is how it is tested. Resources come
from ``--slurm_*`` flags, else from the sweep's ``"slurm"`` entry (``get_sweep()`` returning
``{..., "slurm": dict(nodes=1, gpus_per_node=8, time_min=240, partition="gpu")}``), else the defaults
of :class:`Resources`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time
from typing import Any, Callable, Sequence

from kdlab.errors import UserError

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclasses.dataclass(frozen=True)
class Resources:
  """What each run's job asks for: ``nodes`` (processes, one per node), ``gpus_per_node``,
  ``cpus_per_task``, ``time_min`` (wall-clock limit), ``partition`` and ``mem_gb`` (None: the cluster's default)."""
  nodes: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int | None = None
  time_min: int = 60
  partition: str | None = None
  mem_gb: int | None = None


def resources(from_file: Any, flags: dict[str, Any]) -> Resources:
  """The :class:`Resources` of the sweep's ``"slurm"`` entry overridden by the ``--slurm_*`` flags given."""
  fields = {f.name: f for f in dataclasses.fields(Resources)}
  values: dict[str, Any] = {}
  if from_file is not None:
    if not isinstance(from_file, dict):
      raise UserError(f"--sweep: 'slurm': {from_file!r} is not a dict; e.g. \"slurm\": dict(nodes=1, gpus_per_node=8, "
                      f"time_min=240, partition='gpu')")
    unknown = sorted(set(from_file) - set(fields))
    if unknown:
      raise UserError(f"--sweep: 'slurm': unknown field {unknown[0]!r}; use {', '.join(fields)}")
    values.update(from_file)
  values.update({k: v for k, v in flags.items() if v is not None})
  for name, value in values.items():
    where = f"--slurm_{name} (or the sweep's slurm[{name!r}])"
    if name == "partition":
      if value is not None and (not isinstance(value, str) or not value):
        raise UserError(f"{where}={value!r}: give the partition's name")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < (0 if name == "gpus_per_node" else 1)):
      raise UserError(f"{where}={value!r}: use a whole number >= {0 if name == 'gpus_per_node' else 1}")
  return Resources(**values)


@dataclasses.dataclass(frozen=True)
class RunTask:
  """One run of a sweep, as a job array task trains it (pickled by submitit): its whole config
  (an ``ml_collections.ConfigDict``) and workdir."""
  config: Any
  workdir: str
  run_name: str
  use_wandb: bool
  timeout_s: float


def run_task(task: RunTask) -> str:
  """A job's entry point: joins the job's other nodes (if any), then trains ``task``'s run; returns its name."""
  import submitit
  from kdlab import distributed
  env = submitit.JobEnvironment()
  if env.num_tasks > 1:
    host = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    # Every task of the job derives the same port from the job's id.
    port = 20000 + int(hashlib.sha1(str(env.job_id).encode()).hexdigest(), 16) % 30000
    distributed.initialize(distributed.Cluster(f"{host}:{port}", env.num_tasks, env.global_rank,
                                               timeout_s=task.timeout_s))
  from kdlab.train.loop import train
  train(task.config, pathlib.Path(task.workdir), use_wandb=task.use_wandb, progress=False)
  return task.run_name


def submit(tasks: Sequence[RunTask], launcher: str, res: Resources, folder: pathlib.Path, parallel: int,
           on_done: Callable[[str, BaseException | None], None]) -> None:
  """Submits ``tasks`` as one job array and waits for it, calling ``on_done(run name, error or None)``
  as each job ends (job logs in ``folder``)."""
  import submitit
  executor = submitit.AutoExecutor(folder=folder, cluster="local" if launcher == "submitit-local" else "slurm")
  params: dict[str, Any] = dict(timeout_min=res.time_min, gpus_per_node=res.gpus_per_node, name="kdlab-sweep")
  if launcher == "submitit-local":  # One local process per node.
    params.update(tasks_per_node=res.nodes)
  else:
    params.update(nodes=res.nodes, tasks_per_node=1, slurm_array_parallelism=parallel)
    if res.partition is not None:
      params["slurm_partition"] = res.partition
    if res.mem_gb is not None:
      params["mem_gb"] = res.mem_gb
  if res.cpus_per_task is not None:
    params["cpus_per_task"] = res.cpus_per_task
  executor.update_parameters(**params)
  jobs = executor.map_array(run_task, list(tasks))
  pending = dict(zip([t.run_name for t in tasks], jobs))
  try:
    while pending:
      for name, job in list(pending.items()):
        if job.done():
          del pending[name]
          try:
            job.results()
            on_done(name, None)
          except Exception as e:  # noqa: BLE001 -- submitit wraps the job's failure in its own types.
            on_done(name, e)
      time.sleep(0.5)
  except KeyboardInterrupt:
    for job in pending.values():  # Cancelled jobs resume from their checkpoints when the sweep is rerun.
      job.cancel(check=False)
    raise
