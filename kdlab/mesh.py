"""Device mesh and shardings from config.

``config.mesh = [("data", -1)]`` (optionally ``("fsdp", n)``, ``("model", n)``);
``-1`` takes the devices left over. Batches are sharded over the data-parallel
axes (``data`` and ``fsdp``); parameters by their logical axis names through
``config.sharding_rules`` (``[("vocab", "model"), ("mlp", "model"), ...]``): the
student's params, their optimizer state and the EMA copy, and each teacher's params
(names without a rule, and models without names, are replicated). A rule naming an
axis the mesh lacks, or a dimension its axis does not divide, is a ``UserError``.
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


def rule_map(rules: Sequence[Sequence[Any]], mesh: Mesh) -> dict[str, str | None]:
  """``config.sharding_rules`` as ``{logical name: mesh axis or None}``; every axis must be the mesh's."""
  out: dict[str, str | None] = {}
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      raise UserError(f"config.sharding_rules: {rule!r} is not a (logical name, mesh axis) pair; "
                      f"e.g. [('vocab', 'model'), ('mlp', 'model')]")
    name, axis = rule
    if axis is not None and axis not in mesh.shape:
      raise UserError(f"config.sharding_rules: {tuple(rule)!r} names mesh axis {axis!r}, which config.mesh "
                      f"{dict(mesh.shape)} lacks; add it to config.mesh or map {name!r} to one of "
                      f"{', '.join(mesh.axis_names)} (or None)")
    out[str(name)] = axis
  return out


def param_shardings(module: nnx.Module, mesh: Mesh, rules: Sequence[Sequence[Any]], field: str) -> Any:
  """NamedShardings of ``module``'s ``nnx.Param`` values, as ``nnx.to_pure_dict`` lays them out.

  Each dimension's logical axis name (``nnx.with_partitioning``) goes to the mesh axis ``rules``
  maps it to; names without a rule, and parameters without names (MLPs, zoo models), are
  replicated. ``field`` (``config.model``) names the model in errors.
  """
  axes_of = rule_map(rules, mesh)
  params = nnx.state(module, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))

  def one(path: Any, spec: Any, value: Any) -> NamedSharding:
    names = tuple(spec) if isinstance(spec, P) else ()
    where = "/".join(str(getattr(k, "key", k)) for k in path)
    axes: list[str | None] = []
    for dim, name in enumerate(names):
      axis = axes_of.get(name) if isinstance(name, str) else None
      if axis is not None and axis in axes:
        raise UserError(f"config.sharding_rules: {field} parameter {where} maps two dimensions to mesh axis "
                        f"{axis!r}; map its names {names} to different axes")
      if axis is not None and value.shape[dim] % mesh.shape[axis]:
        raise UserError(f"config.sharding_rules: {field} parameter {where} {list(value.shape)}: its {name!r} "
                        f"dimension {value.shape[dim]} is not divisible by mesh axis {axis!r} of size "
                        f"{mesh.shape[axis]}; change config.mesh or the rule for {name!r}")
      axes.append(axis)
    return NamedSharding(mesh, P(*axes))

  return jax.tree.map_with_path(one, specs, nnx.to_pure_dict(params), is_leaf=lambda x: isinstance(x, P))


def follow_params(tree: Any, params: Any, shardings: Any, default: NamedSharding) -> Any:
  """Shardings for ``tree`` holding copies of ``params`` (an optax state): a leaf whose key path
  ends with a parameter's and whose shape is that parameter's gets its sharding, others ``default``."""
  def key(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  by_path = {key(path): (tuple(value.shape), sharding)
             for (path, value), sharding in zip(flat, jax.tree.leaves(shardings))}
  depth = max((len(k) for k in by_path), default=0)

  def one(path: Any, value: Any) -> NamedSharding:
    names = key(path)
    for n in range(min(depth, len(names)), 0, -1):
      shape, sharding = by_path.get(names[-n:], (None, None))
      if sharding is not None and shape == tuple(getattr(value, "shape", ())):
        return sharding
    return default

  return jax.tree.map_with_path(one, tree)


def global_batch(batch: dict[str, Any], mesh: Mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split over the data axes (axis 1 when ``stacked``)."""
  sharding = batch_sharding(mesh, leading_axes=1 if stacked else 0)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
