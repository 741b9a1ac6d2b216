"""Device mesh and shardings from config.

``config.mesh = [("data", -1)]`` (optionally ``("fsdp", n)``, ``("model", n)``);
``-1`` takes the devices left over. Batches are sharded over the data-parallel
axes (``data`` and ``fsdp``); parameters by their logical axis names through
``config.sharding_rules`` (``[("vocab", "model"), ("mlp", "model"), ...]``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdlab.errors import UserError

DATA_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes of ``axes`` (``[(name, size), ...]``, one size may be -1)."""
  devices = list(devices if devices is not None else jax.devices())
  names = [str(a[0]) for a in axes]
  sizes = [int(a[1]) for a in axes]
  if not names or len(set(names)) != len(names):
    raise UserError(f"config.mesh={list(axes)}: give distinct axis names, e.g. [('data', -1)]")
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or known <= 0 or len(devices) % known:
    raise UserError(f"config.mesh={list(axes)}: sizes must multiply to the {len(devices)} devices "
                    f"(at most one -1)")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise UserError(f"config.mesh={list(axes)}: sizes multiply to {math.prod(sizes)}, "
                    f"but there are {len(devices)} devices")
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """The batch axis (after ``leading_axes`` unsplit axes, e.g. vmapped seeds) split over the data axes."""
  axes = tuple(a for a in DATA_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(*([None] * leading_axes), axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "config.data.batch_size") -> None:
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise UserError(f"{field}={batch_size} is not divisible by the data-parallel size {n} "
                    f"(mesh {dict(mesh.shape)}); use a multiple of {n}")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[Sequence[str]]) -> Any:
  """NamedShardings for an ``nnx.State`` from its variables' logical axis names."""
  rule_map = {str(k): v for k, v in rules}

  def to_mesh(spec: P) -> NamedSharding:
    axes = []
    for name in spec:
      axis = rule_map.get(name) if isinstance(name, str) else None
      axes.append(axis if axis in mesh.shape else None)
    return NamedSharding(mesh, P(*axes))

  specs = nnx.get_partition_spec(state)
  return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))


def global_batch(batch: dict[str, Any], mesh: Mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split over the data axes (axis 1 when ``stacked``)."""
  sharding = batch_sharding(mesh, leading_axes=1 if stacked else 0)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
