"""``kdlab cache-teacher``: run ``config.teachers[0]`` once over the training text and store its top-k outputs.

The cache format, its writer and its reader are :mod:`kdlab.data.teacher_cache`; what a cache depends
on (its fingerprint) is :func:`kdlab.train.teachers.fingerprint`.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import jax

from kdlab import mesh as meshlib
from kdlab.data import teacher_cache
from kdlab.errors import UserError
from kdlab.train import teachers as teacherlib
from kdlab.train.step import run_teachers


def cache_teacher(config: Any, out_dir: str | os.PathLike, *, shard_size: int = teacher_cache.DEFAULT_SHARD_SIZE,
                  progress: bool = False, config_spec: str | None = None) -> tuple[dict[str, Any], bool]:
  """``kdlab cache-teacher``: ``config.teachers[0]`` over the train split of ``config.data``.

  Keeps ``config.teacher_cache_k`` tokens per position, calling the teacher on
  ``config.data.eval_batch_size`` sequences at a time on ``config.mesh`` (batch split over the
  data axes). With several processes (:func:`kdlab.distributed.initialize` called first) each one
  computes and writes its rows of every batch. Returns :func:`build_cache`'s ``(meta, built)``.
  """
  k = teacher_cache.teacher_k(config)
  dataset = teacherlib.train_text(config)
  fp = teacherlib.fingerprint(config, dataset=dataset)
  spec = teacherlib.teacher_spec(config.teachers[0], 0)
  max_len = spec["model"].get("max_len")
  if max_len is not None and config.data.seq_len > max_len:
    raise UserError(f"config.data.seq_len={config.data.seq_len} exceeds config.teachers[0].model.max_len="
                    f"{max_len}; use the teacher's sequence length or shorter")
  mesh = meshlib.make_mesh(config.mesh)
  batch_size = int(config.data.get("eval_batch_size") or config.data.batch_size)
  meshlib.check_batch_size(batch_size, mesh, "config.data.eval_batch_size")
  teachers, variables = teacherlib.load_teachers([spec], mesh)
  sharding = meshlib.batch_sharding(mesh)

  @jax.jit
  def logits(v, tokens, segment_ids=None, positions=None):
    tokens = jax.lax.with_sharding_constraint(tokens, sharding)
    return run_teachers(teachers, [v], tokens, segment_ids=segment_ids, positions=positions)[0].logits

  info = {"config": config_spec, "teacher_init": str(pathlib.Path(spec["init"]).absolute()),
          "teacher_model": spec["model"], "data": config.data.to_dict() if hasattr(config.data, "to_dict")
          else dict(config.data)}
  return teacher_cache.build_cache(functools.partial(logits, variables[0]), dataset, k=k, out_dir=out_dir,
                                   fingerprint=fp, batch_size=batch_size, shard_size=shard_size, info=info,
                                   progress=progress, mesh=mesh)
