#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu/requirements.txt into benchmarks/gpu/wheels/ (git-ignored),
# for CPython 3.11-3.13 (jax 0.11 needs 3.11+) on x86_64 Linux, so that run.sh can install them on a machine without
# network access. Run it here (package index reachable) before carrying the tree to the GPU machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
mkdir -p "$here/wheels"
for v in 3.11 3.12 3.13; do
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$here/wheels" \
    --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -r "$here/requirements.txt"
done
du -sh "$here/wheels"
