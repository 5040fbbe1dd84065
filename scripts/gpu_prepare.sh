#!/usr/bin/env bash
# Make .gpu/, what scripts/gpu_check.sh needs on a GPU machine that reaches no package registry; run it
# here (PyPI reachable), then carry .gpu with the working tree. It holds:
#   - llama-cpp-python's sdist, the installed version, slimmed to what a CUDA build and the check use
#     (llama.cpp's docs, tests, tools, other GPU backends and every vocabulary but llama-bpe's removed);
#   - wheels, for the GPU machine's Python, of the packages the miner needs that its image lacks.
# The folder is ignored by git; 64 MiB is all a device call carries, working tree included.
# Usage: scripts/gpu_prepare.sh [FOLDER]   (default .gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
target_python=${GPU_PYTHON_VERSION:-3.12}  # the GPU image's python3
limit_mib=${CARRY_LIMIT_MIB:-56}  # 64 MiB for the call, less what the working tree takes

version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
llama_version=$(version llama-cpp-python)
out=${1:-.gpu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out/wheels"

# The sdist `scripts/setup.sh --dev` keeps for the converter (models/llama_cpp_source.py), else from PyPI.
cached=${XDG_CACHE_HOME:-$HOME/.cache}/storynet-miner/llama-cpp-python-$llama_version/llama_cpp_python-$llama_version.tar.gz
if [ -f "$cached" ]; then
  cp "$cached" "$tmp/"
else
  "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$tmp"
fi
tar -xzf "$tmp/llama_cpp_python-$llama_version.tar.gz" -C "$tmp"
src="$tmp/llama_cpp_python-$llama_version"
vendor="$src/vendor/llama.cpp"
rm -rf "$vendor"/{docs,tests,benches,examples,pocs,tools,media,scripts,app,skills,grammars,requirements,.github,.devops} \
  "$src"/{docs,.git,.github,examples,docker,tests}  # the sdist carries its own .git: 39 of its 74 MB
find "$vendor/models" -mindepth 1 ! -name ggml-vocab-llama-bpe.gguf -delete
for backend in "$vendor"/ggml/src/ggml-*/; do
  case "$(basename "$backend")" in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$backend" ;; esac
done
tar -czf "$out/llama-cpp-python-$llama_version-slim.tar.gz" -C "$tmp" "llama_cpp_python-$llama_version"

# What the check imports (the miner, bench.py, loadtest.py with bittensor's Axon and Dendrite) and the GPU
# image lacks (scripts/gpu_image_packages.txt); pure Python or abi3/cp wheels for its Python. The CPU
# rehearsal in tests/test_gpu_tools.py fails when one is missing.
wheels=(llguidance pydantic pydantic-core annotated-types typing-inspection gguf diskcache
        bittensor bittensor-wallet bittensor-drand async-substrate-interface asyncstdlib aiosqlite cyscale
        fastapi starlette uvicorn websockets netaddr opentelemetry-api msgpack-numpy-opentensor
        python-statemachine sniffio)
pins=()
for name in "${wheels[@]}"; do pins+=("$name==$(version "$name")"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_python" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_34_x86_64 -d "$out/wheels" "${pins[@]}"

size_mib=$(( $(du -sb "$out" | cut -f1) / 1048576 ))
echo "$out: ${size_mib} MiB (llama-cpp-python $llama_version, ${#pins[@]} wheels for Python $target_python)"
if (( size_mib > limit_mib )); then
  echo "error: $out is ${size_mib} MiB, over the ${limit_mib} MiB a device call can carry beside the tree" >&2
  exit 1
fi
