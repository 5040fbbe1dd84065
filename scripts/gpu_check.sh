#!/usr/bin/env bash
# The GPU proof in one device call, from the repository root, with .gpu (scripts/gpu_prepare.sh) carried:
#     device run: bash scripts/gpu_check.sh      carry: [".gpu"]      timeout_s: 600
# 1. Builds llama-cpp-python with CUDA for the card present, from the carried sdist, into /tmp/site,
#    while it writes an F16 file of Llama-3.1-8B's shapes (random weights, the real tokenizer).
# 2. Quantizes that file to Q4_K_M; plans it with `miner fit --vram-gb 6`; loads it with that plan,
#    measuring VRAM against the plan; writes one answer per task; runs scripts/bench.py under vram_gb 6.
#    Its step rows time each batch shape with a KV stream per sequence and with one unified cache: that
#    settles kv_unified on a GPU.
# Every step appends its results to $OUT/gpu_check.json and $OUT/gpu_check.md as it finishes, so a
# timeout keeps what finished. Exits 2, saying why, where there is no GPU or no .gpu folder.
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
rm -rf "$work" && mkdir -p "$work/src" "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
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
"$python" scripts/gpu_check.py f16 --vocab "$src/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf" \
  --work "$work" --out "$out" || { kill "$build"; exit 1; }
if ! wait "$build"; then
  "$python" scripts/gpu_check.py failed --out "$out" --step build --log "$out/build.log"
  exit 1
fi
"$python" scripts/gpu_check.py rest --work "$work" --out "$out" --build-seconds $(( $(date +%s) - started ))
