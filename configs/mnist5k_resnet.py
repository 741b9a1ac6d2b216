"""CIFAR-style ResNets on mnist5k: a resnet20 teacher, a resnet8 student, every distillation method.

  kdlab train --config=configs/mnist5k_resnet.py:teacher --workdir=runs/mnist5k_methods/teacher
  kdlab train --config=configs/mnist5k_resnet.py:student --workdir=runs/mnist5k_methods/student
  kdlab train --config=configs/mnist5k_resnet.py:crd+kd --workdir=runs/mnist5k_methods/crd+kd \\
      --config.teachers[0].init=runs/mnist5k_methods/teacher/checkpoints

``experiments/mnist5k_methods.py`` runs all of them over 3 seeds (see there for the table).

Variants (``arg`` is ``VARIANT[,key=value...]``):
  teacher  resnet20, CE only, +/-2 pixel jitter, ``teacher_epochs`` epochs.
  student  resnet8, CE only: the from-scratch baseline.
  METHOD   resnet8 distilled from ``config.teachers[0]`` with one of :data:`METHODS`.

Both models are the zoo's CIFAR ResNets (RepDistiller's, same widths 16/16/32/64) built with
``in_channels=1``; at 28x28 the stages are 28x28x16, 28x28x16, 14x14x32 and 7x7x64, ``pool`` 64.
Every student (scratch or distilled) uses the same recipe: SGD momentum 0.9, weight decay 5e-4,
batch 64, lr 0.05 cosine-decayed over ``epochs`` epochs, +/-2 pixel jitter (the teacher sees the
same augmented batch). Each method uses RepDistiller's weights for the resnet32x4 -> resnet8x4
CIFAR-100 scripts (``scripts/run_cifar_distill.sh``: ``-r`` CE, ``-a`` KD at T = 4, ``-b`` the
method's loss) and its tap choices for 3-stage ResNets; DKD uses mdistiller's CIFAR weights. See
:func:`method_objective` for each one and for the methods outside the CRD table.

AB, FSP and FT pre-train before distilling, as RepDistiller's ``init`` stage (30 init epochs
before 240): here ``init_epochs`` extra epochs come first, so the distillation stage still has
``epochs`` epochs. AB and FSP train the student's feature layers (and AB's connector) with the
feature loss alone, then train with CE only (RepDistiller adds no feature loss after ``init``);
their weights switch by schedule at the end of the init stage. FT pre-trains its paraphraser
(and translator) with ``connector_warmup_steps`` (the student is frozen meanwhile).

Options: ``epochs=N`` (students), ``teacher_epochs=N``, ``init_epochs=N``, ``batch=N``, ``lr=X``,
``teacher=DIR/checkpoints``, ``source=mnist5k|digits|tfds:mnist``, ``omit=3`` (digits dropped from the
training set), ``quick`` (a tiny run for tests).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from common import MLP_OPTIONS, mnist_mlp, parse_arg

TEACHER_MODEL, STUDENT_MODEL = "resnet14", "resnet8"
TEACHER_INIT = "runs/mnist5k_methods/teacher/checkpoints"
TRAIN_EXAMPLES = {"mnist5k": 4000, "digits": 1438, "tfds:mnist": 60000}
EPOCHS, TEACHER_EPOCHS = 3, 15
LEARNING_RATE = 0.1
INIT_FRACTION = 30 / 240  # RepDistiller: 30 init epochs before 240 (ab, fsp, ft).
DKD_WARMUP = 20 / 240     # mdistiller: DKD's weight ramps up over 20 of 240 epochs.
KD_T = 4.0                # RepDistiller's --kd_T, mdistiller's DKD.T.
FT_PARAPHRASER_LR = 0.01  # RepDistiller's lr for FT's paraphraser (helper/pretrain.py, ResNet students).
STAGES = ["stage1", "stage2", "stage3"]
PREACTS = [f"{s}_preact" for s in STAGES]
# The CRD table's methods (RepDistiller), DKD (mdistiller), then the other terms of kdlab/objective/terms/
# that apply to a CNN classifier (attention_kl / value_relation need transformer attention maps).
METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd+kd",
           "dkd", "reverse_kl", "jsd", "tvd", "logit_l2", "hard_ce", "info_nce")
# Methods with RepDistiller's init stage before distillation.
PRETRAINED = ("ab", "fsp", "ft")
OPTIONS = ("teacher_epochs", "init_epochs", "batch", "lr", "teacher", *MLP_OPTIONS)


def _switch(init: float, end: float, at_step: int) -> Any:
  """A weight that is ``init`` for steps ``0 .. at_step - 1`` and ``end`` from ``at_step`` on."""
  if at_step <= 0:
    return end
  return dict(schedule="linear", init=init, end=end, steps=1, transition_begin=at_step - 1)


def method_objective(method: str, init_steps: int, dkd_warmup_steps: int, lr: float) -> list[dict[str, Any]]:
  """``config.objective`` of a distilled student: CE plus the method's terms, RepDistiller's weights.

  The CRD table's methods and DKD follow ``method_objective`` of configs/cifar100_crd.py (the same
  weights and taps; that one is keyed by the benchmark's pairs). ``init_steps``: the init stage of
  ab / fsp (0 for the others); ``dkd_warmup_steps``: DKD's linear weight warm-up; ``lr``: the
  student's learning rate (FT's paraphraser step is set relative to it).
  """
  ce = lambda w: dict(loss="ce", weight=w)
  kd = lambda w: dict(loss="kd", weight=w, temperature=KD_T)
  objectives = {
      # -r 0.1 -a 0.9 -b 0.
      "kd": lambda: [ce(0.1), kd(0.9)],
      # The rest of the CRD table: -r 1 -a 0 -b BETA on RepDistiller's taps for 3-stage ResNets.
      "fitnet": lambda: [ce(1.0), dict(loss="fitnet", weight=100.0, student="stage2", teacher="stage2")],
      "at": lambda: [ce(1.0), dict(loss="at", weight=1000.0, p=2, student=STAGES)],
      "sp": lambda: [ce(1.0), dict(loss="sp", weight=3000.0, student="stage3")],
      "cc": lambda: [ce(1.0), dict(loss="cc", weight=0.02, gamma=0.4, order=2, feat_dim=128, student="pool")],
      "vid": lambda: [ce(1.0), dict(loss="vid", weight=1.0, init_var=5.0, student=STAGES)],
      # RKDLoss: 25 x distance + 50 x angle on the pooled embedding, -b 1.
      "rkd": lambda: [ce(1.0), dict(loss="rkd_distance", weight=25.0, student="pool"),
                      dict(loss="rkd_angle", weight=50.0, student="pool")],
      "pkt": lambda: [ce(1.0), dict(loss="pkt", weight=30000.0, student="pool")],
      "nst": lambda: [ce(1.0), dict(loss="nst", weight=50.0, student=STAGES)],
      # The term's weight (200) multiplies its reconstruction error too: reconstruction_weight 1 trains
      # the paraphraser at 200 x the lr and diverges (NaN within 4 steps here). RepDistiller pre-trains
      # it at lr 0.01 for ResNets (then freezes it); this weight gives it that step size.
      "ft": lambda: [ce(1.0), dict(loss="ft", weight=200.0, p=1, rate=0.5,
                                   reconstruction_weight=FT_PARAPHRASER_LR / (200.0 * lr), student="stage3")],
      # num_negatives: the default min(4096, N - 1); RepDistiller's 16384 exceeds our 4,000 examples.
      "crd": lambda: [ce(1.0), dict(loss="crd", weight=0.8, temperature=0.07, momentum=0.5, feat_dim=128,
                                    student="pool")],
      "crd+kd": lambda: [ce(1.0), kd(1.0), dict(loss="crd", weight=0.8, temperature=0.07, momentum=0.5,
                                                feat_dim=128, student="pool")],
      # mdistiller's DKD for CIFAR-100: CE 1, alpha 1, beta 8, T 4, weight warmed up linearly.
      # mdistiller's factor min(epoch / 20, 1) counts epochs from 1, so the ramp starts at 1/20.
      "dkd": lambda: [ce(1.0), dict(loss="dkd", alpha=1.0, beta=8.0, temperature=KD_T,
                                    weight=dict(schedule="linear", init=1 / 20, end=1.0,
                                                steps=max(1, dkd_warmup_steps * 19 // 20)))],
      # KL-type divergences with the T^2 scaling: KD's recipe.
      "reverse_kl": lambda: [ce(0.1), dict(loss="reverse_kl", weight=0.9, temperature=KD_T)],
      "jsd": lambda: [ce(0.1), dict(loss="jsd", weight=0.9, beta=0.5, temperature=KD_T)],
      # No published CIFAR weight: RepDistiller's default CE weight 1 + docs/losses.md's weight.
      "tvd": lambda: [ce(1.0), dict(loss="tvd", weight=1.0, temperature=1.0)],
      "logit_l2": lambda: [ce(1.0), dict(loss="logit_l2", weight=1.0)],
      "hard_ce": lambda: [ce(1.0), dict(loss="hard_ce", weight=1.0)],
      "info_nce": lambda: [ce(1.0), dict(loss="info_nce", weight=1.0, temperature=0.1, feat_dim=128,
                                         student="pool")],
  }
  if method == "ab":
    # Init: ABLoss on the three stages' pre-activations, layer weights 2^(i-n+1) x 3/1000; then CE only.
    on, off = (lambda w: _switch(w, 0.0, init_steps)), (lambda w: _switch(0.0, w, init_steps))
    return [dict(loss="ce", weight=off(1.0))] + [
        dict(loss="ab", name=f"ab_{tap}", weight=on(0.003 * 2.0 ** (i - 2)), margin=1.0, student=tap)
        for i, tap in enumerate(PREACTS)]
  if method == "fsp":
    # Init: the unweighted sum of FSP losses over consecutive taps (stem, stage1, stage2, stage3);
    # RepDistiller's -b 50 is never applied (its loss_kd is 0 after init). Then CE only.
    on, off = (lambda w: _switch(w, 0.0, init_steps)), (lambda w: _switch(0.0, w, init_steps))
    taps = ["stem", *STAGES]
    return [dict(loss="ce", weight=off(1.0)),
            dict(loss="fsp", weight=on(1.0), student=[list(p) for p in zip(taps, taps[1:])])]
  if method not in objectives:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  return objectives[method]()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, options = parse_arg(arg, ("teacher", "student", *METHODS), default="kd", options=OPTIONS)
  quick = "quick" in options
  c = mnist_mlp("student", options)  # The shared skeleton (data source, optimizer and train fields).
  c.method = variant  # Which recipe this is; experiments/mnist5k_methods.py names its table rows by it.
  source = c.data.source
  c.data.batch_size = int(options.get("batch", 16 if quick else 64))
  c.data.augment = "jitter"
  c.data.mean, c.data.std = ((0.0,), (1.0,)) if source == "digits" else ((0.1307,), (0.3081,))
  model = TEACHER_MODEL if variant == "teacher" else STUDENT_MODEL
  c.model = ml_collections.ConfigDict(dict(name=model, num_classes=10, in_channels=1))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=float(options.get("lr", LEARNING_RATE)), momentum=0.9, nesterov=False,
      weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, boundaries_epochs=[], decay=0.1))

  steps_per_epoch = TRAIN_EXAMPLES.get(source, 4000) // c.data.batch_size
  default_epochs = 1 if quick else (TEACHER_EPOCHS if variant == "teacher" else EPOCHS)
  epochs = float(options.get("teacher_epochs" if variant == "teacher" else "epochs", default_epochs))
  init_epochs = float(options.get("init_epochs", INIT_FRACTION * epochs)) if variant in PRETRAINED else 0.0
  init_steps = int(round(init_epochs * steps_per_epoch))
  c.train.num_epochs = epochs + init_steps / steps_per_epoch
  c.train.eval_every_epochs = 0.5 if quick else 1.0
  c.train.checkpoint_every_epochs = c.train.num_epochs  # Short runs: one checkpoint, at the end.
  c.train.log_every_steps = 5 if quick else 20
  if variant in ("teacher", "student"):
    c.objective = [dict(loss="ce", weight=1.0)]
    return c
  c.teachers = [dict(init=options.get("teacher", TEACHER_INIT))]
  c.objective = method_objective(variant, init_steps, dkd_warmup_steps=int(DKD_WARMUP * epochs * steps_per_epoch),
                                 lr=c.optimizer.learning_rate)
  if variant == "ft":
    c.connector_warmup_steps = init_steps
  return c
