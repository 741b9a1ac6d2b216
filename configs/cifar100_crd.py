"""The CIFAR-100 benchmark of CRD (Tian et al. 2020, RepDistiller) with DKD (Zhao et al. 2022, mdistiller).

Run (the teacher first, then any student of it):
  kdlab train --config=configs/cifar100_crd.py:teacher-resnet32x4 --workdir=runs/cifar100/teacher-resnet32x4
  kdlab train --config=configs/cifar100_crd.py:resnet32x4-resnet8x4-crd \\
      --workdir=runs/cifar100/resnet32x4-resnet8x4-crd
``paper_repro/crd2019/run.py --pair resnet32x4-resnet8x4 --method crd`` does both (README there).

Variants (``arg`` is ``VARIANT[,key=value...]``):
  teacher-MODEL            a teacher of the table trained with CE (RepDistiller's train_teacher.py).
  TEACHER-STUDENT-METHOD   a student of one of the 13 pairs of :data:`PAIRS` with one of
                           :data:`METHODS` (``ce``, alias ``vanilla``: the student from scratch).
Options:
  teacher=PATH   the teacher's ``checkpoints/`` folder (default ``runs/cifar100/teacher-TEACHER/checkpoints``).
  data_dir=PATH  TFDS data directory holding a prepared ``cifar100``.
  seed=N         run seed.
  batch=N        batch size (step-based weight schedules follow it; use this, not --config.data.batch_size).
  steps=N        train N steps in all instead of the epochs (a smoke run).
  init_steps=N   length of the init stage of ab / fsp / ft (default 30 epochs).
  mock           ``batch=8,steps=2,init_steps=1`` and small eval batches: a 2-step check on
                 ``tfds.testing.mock_data`` (tests, ``paper_repro/crd2019/check_all.py``).

Recipe (both papers): SGD momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 (0.01 for
MobileNetV2 / ShuffleV1 / ShuffleV2 students), x0.1 at epochs 150, 180 and 210; random crop 32 with
4-pixel zero padding, horizontal flip, per-channel normalization. Each method's terms, weights and
taps follow ``train_student.py`` / ``helper/loops.py`` / ``scripts/run_cifar_distill.sh`` of
RepDistiller (``-r`` CE weight, ``-a`` KD weight at T = 4, ``-b`` the method's weight) and
mdistiller's ``configs/cifar100/dkd/*.yaml``; :func:`method_objective` says which is which.

Init stages (RepDistiller's ``helper/pretrain.py``, ``init_epochs = 30`` before the 240 epochs):
here the init stage comes first inside one run of 270 epochs, and the learning-rate decays move to
epochs 180 / 210 / 240 so the distillation stage keeps RepDistiller's 240-epoch schedule.
  ab   the student's feature layers and the AB connectors learn from the AB loss alone, then the
       student trains with CE alone (RepDistiller's loss_kd is 0 after init): weight schedules.
  fsp  the same with the FSP loss (unweighted sum over consecutive taps; ``-b 50`` is never used).
  ft   the paraphraser pre-trains as an autoencoder of the teacher's last stage while the student is
       frozen (``config.connector_warmup_steps``); then CE + 200 x FT.
Deviations are listed in ``paper_repro/crd2019/README.md``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from common import mnist_mlp

# The CRD paper's Table 1 (same architecture) and Table 2 (different architectures): (teacher, student).
SAME_ARCH = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
CROSS_ARCH = (("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
              ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))
PAIRS = SAME_ARCH + CROSS_ARCH
TEACHERS = tuple(sorted({t for t, _ in PAIRS}))
METHODS = ("ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd+kd",
           "dkd")
ALIASES = {"vanilla": "ce"}
# FSP compares Gram matrices of consecutive taps, so every tap needs the teacher's width; the paper
# has an FSP number only for these pairs (none for WRN-40-2 -> WRN-40-1 or any cross-architecture pair).
FSP_PAIRS = tuple(p for p in SAME_ARCH if p != ("wrn_40_2", "wrn_40_1"))
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # RepDistiller: lr 0.01 for these.
# Stages exposed as feats stage1..stageN (RepDistiller's feat[1:-1]); feat[0] is "stem", feat[-1] "pool".
NUM_STAGES = {"ResNet50": 4, "vgg8": 4, "vgg13": 4, "MobileNetV2": 4}  # The others have 3.
# mdistiller's configs/cifar100/dkd/<pair>.yaml set DKD.BETA for these pairs (default 8). It has no
# file for resnet110 -> resnet20 (2.0 here, as for its other two small-ResNet pairs) or ResNet50 -> vgg8 (8).
DKD_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet110", "resnet20"): 2.0,
            ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "MobileNetV2"): 6.0}
KD_T = 4.0            # RepDistiller --kd_T, mdistiller DKD.T.
EPOCHS = 240
DECAY_EPOCHS = (150, 180, 210)
INIT_EPOCHS = 30      # RepDistiller --init_epochs (ab, fsp, ft).
DKD_WARMUP_EPOCHS = 20
TRAIN_EXAMPLES = 50_000
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller's dataset/cifar100.py.


def variants() -> list[str]:
  """Every variant of the benchmark: the teachers, then ``TEACHER-STUDENT-METHOD`` cells that exist."""
  cells = [f"{t}-{s}-{m}" for t, s in PAIRS for m in METHODS if applicable(t, s, m)]
  return [f"teacher-{t}" for t in TEACHERS] + cells


def applicable(teacher: str, student: str, method: str) -> bool:
  """Whether the benchmark has this cell (FSP only where all tap widths agree, as in the paper)."""
  return method != "fsp" or (teacher, student) in FSP_PAIRS


def stages(model: str) -> list[str]:
  return [f"stage{i}" for i in range(1, NUM_STAGES.get(model, 3) + 1)]


def _switch(init: float, end: float, at_step: int) -> Any:
  """A weight that is ``init`` for steps ``0 .. at_step - 1`` and ``end`` from ``at_step`` on."""
  if at_step <= 0:
    return end
  return dict(schedule="linear", init=init, end=end, steps=1, transition_begin=at_step - 1)


def method_objective(teacher: str, student: str, method: str, *, init_steps: int, dkd_warmup_steps: int,
                     num_negatives: int | None) -> list[dict[str, Any]]:
  """``config.objective`` of one cell: RepDistiller's ``-r`` / ``-a`` / ``-b`` and taps, mdistiller's DKD.

  Taps follow RepDistiller's ``feat`` lists: ``feat[1:-1]`` (every stage) for AT, NST, VID and AB,
  ``feat[-2]`` (the last stage) for SP and FT, ``feat[hint_layer=2]`` (``stage2``) for FitNet,
  ``feat[-1]`` (``pool``) for CC, RKD, PKT and CRD, ``feat[:-1]`` (stem and stages) for FSP.
  Between maps of different resolution (cross-architecture pairs) AT, NST and FT average-pool
  the larger map to the smaller (``pool=True``) as RepDistiller does; AB's connector then maps the
  student's map to the teacher's size and VID pools on its own.
  """
  taps = stages(student)
  if len(taps) != len(stages(teacher)):
    raise ValueError(f"{teacher} and {student} expose different numbers of stages")
  last = taps[-1]
  pooled = dict(pool=True) if (teacher, student) in CROSS_ARCH else {}
  ce = lambda w: dict(loss="ce", weight=w)
  kd = lambda w: dict(loss="kd", weight=w, temperature=KD_T)
  crd = dict(loss="crd", weight=0.8, temperature=0.07, momentum=0.5, feat_dim=128, student="pool",
             teacher="pool")
  if num_negatives is not None:
    crd["num_negatives"] = num_negatives
  if method == "ce":
    return [ce(1.0)]
  if method == "kd":  # -r 0.1 -a 0.9 -b 0
    return [ce(0.1), kd(0.9)]
  if method == "fitnet":  # -a 0 -b 100, hint_layer 2
    return [ce(1.0), dict(loss="fitnet", weight=100.0, student="stage2", teacher="stage2")]
  if method == "at":  # -a 0 -b 1000, p = 2, summed over the stages
    return [ce(1.0), dict(loss="at", weight=1000.0, p=2, student=taps, teacher=stages(teacher), **pooled)]
  if method == "sp":  # -a 0 -b 3000
    return [ce(1.0), dict(loss="sp", weight=3000.0, student=last, teacher=stages(teacher)[-1])]
  if method == "cc":  # -a 0 -b 0.02, embeddings of dimension 128
    return [ce(1.0), dict(loss="cc", weight=0.02, feat_dim=128, student="pool", teacher="pool")]
  if method == "vid":  # -a 0 -b 1, one VID loss per stage, init_pred_var 5
    return [ce(1.0), dict(loss="vid", weight=1.0, init_var=5.0, eps=1e-5, student=taps, teacher=stages(teacher))]
  if method == "rkd":  # -a 0 -b 1; RKDLoss(w_d=25, w_a=50)
    return [ce(1.0), dict(loss="rkd_distance", weight=25.0, student="pool", teacher="pool"),
            dict(loss="rkd_angle", weight=50.0, student="pool", teacher="pool")]
  if method == "pkt":  # -a 0 -b 30000
    return [ce(1.0), dict(loss="pkt", weight=30000.0, student="pool", teacher="pool")]
  if method == "nst":  # -a 0 -b 50, summed over the stages
    return [ce(1.0), dict(loss="nst", weight=50.0, student=taps, teacher=stages(teacher), **pooled)]
  if method == "crd":  # -a 0 -b 0.8, feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5
    return [ce(1.0), crd]
  if method == "crd+kd":  # -a 1 -b 0.8
    return [ce(1.0), kd(1.0), crd]
  if method == "dkd":
    # mdistiller: CE 1 + min(epoch / 20, 1) x DKD(alpha 1, beta per pair, T 4), epochs counted from 1.
    # The linear ramp equals that factor at the start of every epoch 1..20.
    warm = DKD_WARMUP_EPOCHS
    weight = dict(schedule="linear", init=1.0 / warm, end=1.0, steps=max(1, dkd_warmup_steps * (warm - 1) // warm))
    return [ce(1.0), dict(loss="dkd", weight=weight, alpha=1.0, beta=DKD_BETA.get((teacher, student), 8.0),
                          temperature=KD_T)]
  on = lambda w: _switch(w, 0.0, init_steps)
  off = lambda w: _switch(0.0, w, init_steps)
  if method == "ab":
    # Init: ABLoss on the stages' pre-activations, layer i of n weighted 2^(i-n+1) x 3/1000 (its
    # per-example sum, divided by the batch); then CE only (-b is unused: loss_kd = 0 after init).
    n = len(taps)
    return [ce(off(1.0))] + [
        dict(loss="ab", name=f"ab_{s}", weight=on(0.003 * 2.0 ** (i - n + 1)), margin=1.0,
             student=f"{s}_preact", teacher=f"{t}_preact")
        for i, (s, t) in enumerate(zip(taps, stages(teacher)))]
  if method == "fsp":
    if (teacher, student) not in FSP_PAIRS:
      raise ValueError(f"fsp does not apply to {teacher} -> {student}: the FSP matrices need equal tap widths "
                       f"on both sides (the CRD paper has no FSP number for this pair)")
    chain = ["stem", *taps]
    return [ce(off(1.0)), dict(loss="fsp", weight=on(1.0), student=[list(p) for p in zip(chain, chain[1:])])]
  if method == "ft":
    # -a 0 -b 200; paraphraser rate 0.5, pre-trained during connector_warmup_steps. The term's weight
    # also scales the paraphraser's reconstruction error: 1/200 makes that RepDistiller's plain MSE.
    return [ce(1.0), dict(loss="ft", weight=200.0, p=1, rate=0.5, reconstruction_weight=1.0 / 200.0, student=last,
                          teacher=stages(teacher)[-1], **pooled)]
  raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} (or 'vanilla')")


def parse_variant(variant: str) -> tuple[str, str | None, str]:
  """``"teacher-vgg13"`` -> ``("vgg13", None, "teacher")``; ``"vgg13-vgg8-kd"`` -> ``("vgg13", "vgg8", "kd")``."""
  parts = variant.split("-")
  if len(parts) == 2 and parts[0] == "teacher":
    if parts[1] not in TEACHERS:
      raise ValueError(f"unknown teacher {parts[1]!r} in {variant!r}; choose one of {', '.join(TEACHERS)}")
    return parts[1], None, "teacher"
  if len(parts) != 3:
    raise ValueError(f"variant {variant!r}: expected teacher-MODEL or TEACHER-STUDENT-METHOD, "
                     f"e.g. resnet32x4-resnet8x4-kd")
  teacher, student, method = parts
  method = ALIASES.get(method, method)
  if (teacher, student) not in PAIRS:
    raise ValueError(f"{teacher}-{student} is not a pair of the benchmark; choose one of "
                     f"{', '.join(f'{t}-{s}' for t, s in PAIRS)}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} (or 'vanilla')")
  return teacher, student, method


def _parse_options(arg: str | None) -> tuple[str, dict[str, str]]:
  parts = [p for p in (arg or "teacher-resnet32x4").split(",") if p]
  options = {}
  for p in parts[1:]:
    key, _, value = p.partition("=")
    if key not in ("teacher", "data_dir", "seed", "batch", "steps", "init_steps", "mock"):
      raise ValueError(f"unknown option {key!r}; use teacher=, data_dir=, seed=, batch=, steps=, init_steps= or mock")
    options[key] = value
  return parts[0], options


def _int_option(options: dict[str, str], key: str, default: int) -> int:
  try:
    value = int(options.get(key, default))
  except ValueError:
    raise ValueError(f"option {key}={options[key]!r}: expected an integer") from None
  if value < (0 if key in ("init_steps", "seed") else 1):
    raise ValueError(f"option {key}={value}: out of range")
  return value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = _parse_options(arg)
  teacher, student, method = parse_variant(variant)
  mock = "mock" in options
  batch = _int_option(options, "batch", 8 if mock else 64)
  steps_per_epoch = TRAIN_EXAMPLES // batch
  c = mnist_mlp("student", {})  # The shared skeleton; every field below is set for CIFAR-100.
  c.seed = _int_option(options, "seed", 0)
  c.data = ml_collections.ConfigDict(dict(
      source="tfds:cifar100", data_dir=options.get("data_dir") or None, batch_size=batch,
      eval_batch_size=8 if mock else 500, augment="crop_flip", mean=MEAN, std=STD, exclude_labels=[],
      prefetch_threads=0))  # see configs/common.py; raise it on machines with spare cores
  model = teacher if method == "teacher" else student
  c.model = ml_collections.ConfigDict(dict(name=model, num_classes=100))
  lr = 0.01 if model in SMALL_LR_STUDENTS else 0.05
  pretrained = method in ("ab", "fsp", "ft")
  default_init = 1 if mock else INIT_EPOCHS * steps_per_epoch
  init_steps = _int_option(options, "init_steps", default_init) if pretrained else 0
  init_epochs = init_steps / steps_per_epoch
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=lr, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="piecewise",
      warmup_epochs=0.0, boundaries_epochs=[e + init_epochs for e in DECAY_EPOCHS], decay=0.1))
  c.train.num_epochs = float(EPOCHS + init_epochs)
  c.train.num_steps = _int_option(options, "steps", 2) if mock or "steps" in options else 0
  c.train.eval_every_epochs = 1.0  # RepDistiller and mdistiller evaluate every epoch (best and last).
  c.train.checkpoint_every_epochs = 10.0
  c.train.log_every_steps = 1 if c.train.num_steps else 100
  c.wandb_project = "kdlab-cifar100"
  if method == "teacher":
    c.objective = [dict(loss="ce", weight=1.0)]
    return c
  if method != "ce":
    c.teachers = [dict(init=options.get("teacher") or f"runs/cifar100/teacher-{teacher}/checkpoints")]
  c.objective = method_objective(teacher, student, method, init_steps=init_steps,
                                 dkd_warmup_steps=2 if mock else DKD_WARMUP_EPOCHS * steps_per_epoch,
                                 num_negatives=None if mock else 16384)
  if method == "ft":
    c.connector_warmup_steps = init_steps
  return c
