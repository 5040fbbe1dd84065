#!/usr/bin/env bash
# The GPU proof in two device calls, from the repository root, with .gpu (scripts/gpu_prepare.sh) carried:
#     device run: bash scripts/gpu_check.sh           carry: [".gpu"]   timeout_s: 480
#     device run: bash scripts/gpu_check.sh measure   carry: [".gpu"]   timeout_s: 300   (right after the first)
# Call 1 builds llama-cpp-python with CUDA for the card present, from the carried sdist, into /tmp/site,
# while it writes Llama-3.1-8B's shapes straight in Q4_K_M (random weights, the real tokenizer); then plans
# it with `miner fit --vram-gb 6` and loads it with that plan: VRAM against the plan, one answer per task,
# and the engine's learned speed beside the rate its answers ran at.
# Call 2 finds the build and the model in /tmp (the machine stays warm 30 s after a call) and measures:
# scripts/bench.py (the miner against raw llama.cpp, batching, the KV layouts, a burst) and the 3.2.1
# validators' step (scripts/loadtest.py), as scripts/gpu_check.py says.
# Every step appends its results to $OUT/gpu_check.json and $OUT/gpu_check.md as it finishes, so a
# timeout keeps what finished. Exits 2, saying why, where there is no GPU, no .gpu folder, or (measure)
# no build from a first call.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/llama_build.sh
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none). It runs on the device machine: run" \
       "scripts/gpu_prepare.sh here, then the device tool with: bash scripts/gpu_check.sh, carry .gpu" >&2
  exit 2
fi
sdist=$(ls .gpu/llama-cpp-python-*-slim.tar.gz 2>/dev/null | head -1)
if [ -z "$sdist" ] || [ ! -d .gpu/wheels ]; then
  echo "gpu_check: .gpu is missing or incomplete: run scripts/gpu_prepare.sh here first and carry .gpu" >&2
  exit 2
fi
python=${PYTHON:-python3}
site=/tmp/site
work=/tmp/gpu_check_work
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1

if [ "${1:-}" = measure ]; then
  if ! [ -f "$work/model-Q4_K_M.gguf" ] || ! "$python" -c 'import llama_cpp' 2>/dev/null; then
    echo "gpu_check measure: no build or model in /tmp from a first call (a machine keeps /tmp only 30 s" \
         "after a call): run bash scripts/gpu_check.sh first, then this at once" >&2
    exit 2
  fi
  exec "$python" scripts/gpu_check.py measure --work "$work" --out "$out"
fi

rm -rf "$work" && mkdir -p "$work/src" "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl || exit 1
tar -xzf "$sdist" -C "$work/src"
src=$(ls -d "$work"/src/llama_cpp_python-*)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)

started=$(date +%s)
export_llama_flags  # the flags scripts/setup.sh builds with: GPU hosts often have AMX CPUs
(CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=OFF" \
   CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
   "$python" -m pip install --no-build-isolation --no-deps --no-compile --target "$site" "$src" \
   >"$out/build.log" 2>&1) &
build=$!
"$python" scripts/gpu_check.py model --vocab "$src/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf" \
  --work "$work" --out "$out" || { kill "$build"; exit 1; }
if ! wait "$build"; then
  "$python" scripts/gpu_check.py failed --out "$out" --step build --log "$out/build.log"
  exit 1
fi
"$python" scripts/gpu_check.py prove --work "$work" --out "$out" --build-seconds $(( $(date +%s) - started ))
