"""The installed llama.cpp build: what it targets, and whether it runs on this CPU.

A llama.cpp compiled for instructions this CPU cannot run (AMX from GCC 11/12, a wheel built on another
machine) kills the process at its first batched matmul, with SIGILL or SIGSEGV: no Python error to catch.
So the smoke check decodes a long prompt in a child process and reads how that child ended.

    python -m backends.llama_build [--gpu]     (scripts/setup.sh runs it last; exit 0 when the build runs)
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

SMOKE_TOKENS = 300  # more than one row: ggml's AMX and other batched kernels only run for batches
SMOKE_TIMEOUT_S = 300
SMOKE_TEXT = "The lighthouse keeper wrote down every ship that passed, and every storm that did not. "
REBUILD = ("scripts/setup.sh --rebuild (if that build dies too, a portable one: "
           "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" scripts/setup.sh --rebuild)")
ROOT = Path(__file__).resolve().parents[1]


def system_info() -> str:
    """The features the build uses, from llama_print_system_info: 'CPU: AVX2 AVX512 ...; CUDA: ...'."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # a broken install: the report still has to be made
        return f"llama-cpp-python cannot be loaded ({e}); run scripts/setup.sh"
    sections: list[tuple[str, list[str]]] = []
    for item in llama_cpp.llama_print_system_info().decode(errors="replace").split("|"):
        if " : " in item:  # a backend's first item: "CPU : SSE3 = 1"
            name, item = item.split(" : ", 1)
            sections.append((name.strip(), []))
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key and sections and value != "0":
            sections[-1][1].append(key if value == "1" else f"{key}={value}")
    return "; ".join(f"{name}: {' '.join(features)}" for name, features in sections) or "unknown"


def smoke(command: list[str] | None = None, timeout: float = SMOKE_TIMEOUT_S) -> str | None:
    """Run the child decode (or `command`); None when it worked, else what happened and the fix."""
    command = command or [sys.executable, "-m", "backends.llama_build", "--child"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the llama.cpp smoke check did not finish a {SMOKE_TOKENS}-token prompt in {timeout:g} s"
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode)
        return (f"llama.cpp died with {sig.name} ({signal.strsignal(sig)}) while decoding a {SMOKE_TOKENS}-token "
                f"prompt with the embedded model: this llama.cpp build does not run on this CPU (it was "
                f"compiled for instructions or features this CPU cannot use, such as AMX from GCC 11 or 12). "
                f"Rebuild it for this machine: {REBUILD}")
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"the llama.cpp smoke check failed (exit {done.returncode}): {' / '.join(tail)}"
    return None


def _decode_a_long_prompt(gpu: bool) -> None:
    from llama_cpp import Llama

    from models.embedded import embedded_model_path
    llm = Llama(str(embedded_model_path()), n_ctx=1024, n_batch=512, n_gpu_layers=-1 if gpu else 0, verbose=False)
    tokens = llm.tokenize((SMOKE_TEXT * 40).encode())[:SMOKE_TOKENS]
    llm.eval(tokens)
    llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.llama_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also require GPU offload, and decode on the GPU")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _decode_a_long_prompt(args.gpu)
        return 0
    import llama_cpp
    if args.gpu and not llama_cpp.llama_supports_gpu_offload():
        print("this llama-cpp-python was built without GPU offload: rebuild it with scripts/setup.sh --cuda "
              "--rebuild", file=sys.stderr)
        return 1
    started = time.monotonic()
    problem = smoke([sys.executable, "-m", "backends.llama_build", "--child"] + (["--gpu"] if args.gpu else []))
    if problem:
        print(f"{problem}\nllama.cpp build: {system_info()}", file=sys.stderr)
        return 1
    print(f"llama.cpp {llama_cpp.__version__} runs here: decoded a {SMOKE_TOKENS}-token prompt "
          f"{'on the GPU ' if args.gpu else ''}in {time.monotonic() - started:.1f} s; build: {system_info()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
