"""Device mesh and shardings from config.

``config.mesh = [("data", -1)]`` (optionally ``("fsdp", n)``, ``("model", n)``);
``-1`` takes the devices left over. Batches are sharded over the data-parallel
axes (``data`` and ``fsdp``); parameters by their logical axis names: ``DEFAULT_RULES``
(``embed``/``channels``/``hidden`` over ``fsdp``; ``vocab``/``heads``/``kv_heads``/``mlp``
over ``model``, for the axes the mesh has) overridden name by name by
``config.sharding_rules`` (``[("vocab", None), ("mlp", "fsdp"), ...]``). The student's params,
their optimizer state and the EMA copy are placed so, and each teacher's params by its own
rules (names without a rule, and models without names, are replicated). A rule naming an
axis the mesh lacks, or a dimension its axis does not divide, is a ``UserError``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdlab.config import show
from kdlab.errors import UserError

DATA_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes of ``axes`` (``[(name, size), ...]``, one size may be -1).

  Every entry is a ``(name, size)`` pair with a string name and a whole-number size >= 1 (or -1),
  and one axis is data parallel (``data`` or ``fsdp``): without one every device would compute the
  whole batch. Anything else is a ``UserError`` naming ``config.mesh``.
  """
  devices = list(devices if devices is not None else jax.devices())
  check_mesh_axes(axes)
  names = [str(a[0]) for a in axes]
  sizes = [int(a[1]) for a in axes]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or known <= 0 or len(devices) % known:
    raise UserError(f"config.mesh={list(axes)}: sizes must multiply to the {len(devices)} devices "
                    f"(at most one -1)")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise UserError(f"config.mesh={list(axes)}: sizes multiply to {math.prod(sizes)}, "
                    f"but there are {len(devices)} devices")
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def check_mesh_axes(axes: Any) -> None:
  """``config.mesh`` is well formed: a non-empty list of ``(name, size)`` pairs (see :func:`make_mesh`)."""
  example = "e.g. [('data', -1)] or [('fsdp', 4), ('model', 2)]"
  if not isinstance(axes, (list, tuple)) or not axes:
    raise UserError(f"config.mesh={show(axes)}: not a list of (axis name, size) pairs; use {example}")
  for entry in axes:
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str) or not entry[0]
        or isinstance(entry[1], bool) or not isinstance(entry[1], int)):
      raise UserError(f"config.mesh={show(list(axes))}: entry {show(entry)} is not an (axis name, size) pair; "
                      f"use {example}")
    if entry[1] < 1 and entry[1] != -1:
      raise UserError(f"config.mesh={show(list(axes))}: axis {entry[0]!r} has size {entry[1]}; use a size >= 1, "
                      f"or -1 for the devices left over")
  names = [entry[0] for entry in axes]
  if len(set(names)) != len(names):
    raise UserError(f"config.mesh={show(list(axes))}: an axis name appears twice; give distinct axis names, {example}")
  if not any(name in DATA_AXES for name in names):
    raise UserError(f"config.mesh={show(list(axes))}: no data-parallel axis ('data' or 'fsdp'), so every device would "
                    f"compute the whole batch; add ('data', -1) (or ('data', 1) beside a -1 axis, e.g. [('data', 1), "
                    f"('model', -1)])")


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


# Logical names kdlab's models use, and the mesh axis each goes to by default when the mesh has it:
# FSDP splits the model dimension (and the zoo's channels, the MLP's hidden units); tensor parallelism
# splits vocabulary, heads and MLP width (the Megatron layout). ``config.sharding_rules`` overrides
# these name by name (``("embed", None)`` turns one off).
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "fsdp"), ("channels", "fsdp"), ("hidden", "fsdp"),
    ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
)


def rule_map(rules: Sequence[Sequence[Any]], mesh: Mesh, field: str = "config.sharding_rules"
             ) -> dict[str, str | None]:
  """``rules`` (``config.sharding_rules``) as ``{logical name: mesh axis or None}``; every axis must be the mesh's."""
  out: dict[str, str | None] = {}
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      raise UserError(f"{field}: {rule!r} is not a (logical name, mesh axis) pair; "
                      f"e.g. [('vocab', 'model'), ('mlp', 'model')]")
    name, axis = rule
    if axis is not None and axis not in mesh.shape:
      raise UserError(f"{field}: {tuple(rule)!r} names mesh axis {axis!r}, which config.mesh "
                      f"{dict(mesh.shape)} lacks; add it to config.mesh or map {name!r} to one of "
                      f"{', '.join(mesh.axis_names)} (or None)")
    out[str(name)] = axis
  return out


def param_shardings(module: nnx.Module, mesh: Mesh, rules: Sequence[Sequence[Any]], field: str,
                    rules_field: str = "config.sharding_rules") -> Any:
  """NamedShardings of ``module``'s ``nnx.Param`` values, as ``nnx.to_pure_dict`` lays them out.

  ``module`` may be abstract (``nnx.eval_shape``). Each dimension's logical axis name
  (``nnx.with_partitioning``) goes to the mesh axis ``rules`` maps it to, else to its
  :data:`DEFAULT_RULES` axis when the mesh has that axis; names without either, and parameters
  without names, are replicated. A rule of ``rules`` that cannot apply (an axis used twice in one
  parameter, a dimension the axis does not divide) is a ``UserError`` naming the parameter; a
  default that cannot apply leaves that dimension whole. ``field`` (``config.model``) names the
  model in errors, ``rules_field`` the rules.
  """
  explicit = rule_map(rules, mesh, rules_field)
  defaults = {name: axis for name, axis in DEFAULT_RULES if axis in mesh.shape}
  params = nnx.state(module, nnx.Param)
  with nnx.logical_axis_rules(()):  # The raw logical names: the rules are applied here.
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))

  def one(path: Any, spec: Any, value: Any) -> NamedSharding:
    names = tuple(spec) if isinstance(spec, P) else ()
    where = "/".join(str(getattr(k, "key", k)) for k in path)
    axes: list[str | None] = []
    for dim, name in enumerate(names):
      if not isinstance(name, str):
        axes.append(None)
        continue
      if name in explicit:
        axis = explicit[name]
        if axis is not None and axis in axes:
          raise UserError(f"{rules_field}: {field} parameter {where} maps two dimensions to mesh axis "
                          f"{axis!r}; map its names {names} to different axes")
        if axis is not None and value.shape[dim] % mesh.shape[axis]:
          raise UserError(f"{rules_field}: {field} parameter {where} {list(value.shape)}: its {name!r} "
                          f"dimension {value.shape[dim]} is not divisible by mesh axis {axis!r} of size "
                          f"{mesh.shape[axis]}; change config.mesh or the rule for {name!r}")
      else:
        axis = defaults.get(name)
        if axis is not None and (axis in axes or value.shape[dim] % mesh.shape[axis]):
          axis = None
      axes.append(axis)
    return NamedSharding(mesh, P(*axes))

  return jax.tree.map_with_path(one, specs, nnx.to_pure_dict(params), is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of ``tree``'s arrays (or ``ShapeDtypeStruct`` with shardings): the
  largest shard per leaf, summed (leaves without a sharding count whole)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


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


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """The rows ``(lo, hi)`` of a global batch of ``batch_size`` that this process's devices hold
  (all of them in a single-process run): the share its data pipeline reads."""
  sharding = batch_sharding(mesh)
  spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((batch_size,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  covered = sorted(spans)
  if any(b < a2 for (_, b), (a2, _) in zip(covered, covered[1:])):
    raise UserError(f"config.mesh={dict(mesh.shape)}: this process's devices hold rows {covered} of the batch, not "
                    f"one contiguous block; order the mesh axes with the data-parallel ones first")
  return lo, hi
