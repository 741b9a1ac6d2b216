#!/usr/bin/env bash
# The prepared GPU run: kdlab's LLM distillation step at Llama-3.1-8B / Llama-3.2-1B shapes, its MFU and
# the student's generation throughput (benchmarks/gpu/llm_step.py; output format in its docstring).
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine (no network): installs the missing wheels
#   bash benchmarks/gpu/run.sh --tiny     # tiny shapes on any backend (the test suite runs this on CPU)
#
# The machine must already have jax (0.11 or newer, with its CUDA plugin), flax, optax, orbax-checkpoint,
# safetensors and tokenizers. What else kdlab imports is installed from benchmarks/gpu/wheels/
# (made by fetch_wheels.sh beforehand) without dependencies and without the network; kdlab itself runs
# from this checkout (PYTHONPATH), not installed. Extra arguments go to llm_step.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
if ! "$py" -c "import grain, ml_collections" 2>/dev/null; then
  if [ ! -d "$here/wheels" ]; then
    echo "kdlab: error: benchmarks/gpu/wheels: missing and grain/ml_collections are not installed; run" \
      "benchmarks/gpu/fetch_wheels.sh where the package index is reachable, then carry the folder here" >&2
    exit 2
  fi
  "$py" -m pip install --quiet --no-index --no-deps --find-links "$here/wheels" -r "$here/requirements.txt"
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/llm_step.py" "$@"
