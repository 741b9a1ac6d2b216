#!/bin/sh
# Temperature x alpha ablation (experiments/temperature_alpha.py): trains the Hinton 2x1200 teacher
# once, then the 45 distilled 2x800 students (15 settings x 3 seeds) on mnist5k, then the report.
#
#   sh experiments/run_temperature_alpha.sh [--parallel 2]     -> runs/temperature_alpha/sweep/{results,report}.md
#   QUICK=1 sh experiments/run_temperature_alpha.sh            smoke test: digits, quick configs, 2x2 grid, 1 seed
#
# Time budget (2 CPU cores, at most 30 min): a KD student takes about 25-40 s at the config's default
# 40 epochs, so 45 of them would take 19-30 min on top of the teacher. The students therefore train
# for 20 epochs (--config.train.num_epochs=20 below). Measured here on a machine shared with other
# jobs (load average ~7 on 2 cores): one 20-epoch student took 39 s wall for 21 s of CPU time, and
# the teacher 1.5 s of CPU per epoch (60 epochs: ~1.5 min). On a quiet machine that is about
# 13-20 s per student, 10-15 min for the sweep and under 20 min in all; on a loaded one it can be
# twice that. The sweep resumes if interrupted: rerun the same command. TEACHER=DIR reuses a
# teacher trained elsewhere with the same config (e.g. make demo's runs/hinton2015/mnist5k/teacher).
# W&B is off here; drop --nowandb to log the runs (offline by default) grouped as temperature_alpha.
set -eu
cd "$(dirname "$0")/.."
KDLAB="${KDLAB:-.venv/bin/kdlab}"
if [ -n "${QUICK:-}" ]; then
  ROOT="${ROOT:-runs/temperature_alpha_quick}" OPTS=",source=digits,quick" VARIANT=":tiny" EPOCHS=1
else
  ROOT="${ROOT:-runs/temperature_alpha}" OPTS=",source=mnist5k" VARIANT="" EPOCHS=20
fi
TEACHER="${TEACHER:-$ROOT/teacher}"
start=$(date +%s)
"$KDLAB" train "--config=configs/hinton_mnist.py:teacher$OPTS" "--workdir=$TEACHER" --nowandb --no-progress
"$KDLAB" sweep "--config=configs/hinton_mnist.py:kd$OPTS" "--sweep=experiments/temperature_alpha.py$VARIANT" \
  "--workdir=$ROOT/sweep" --nowandb "--config.teachers[0].init=$TEACHER/checkpoints" \
  "--config.train.num_epochs=$EPOCHS" "$@"
"$KDLAB" report "$ROOT/sweep"
echo "done in $(( $(date +%s) - start )) s"
