"""Speed and memory of the miner's llama.cpp path, against raw llama.cpp on the same model, same run.

For each task: the miner's backend (lazy grammar check, schema-forced text evaluated in batches), raw
llama-cpp-python free text of the same length (no constraint: the usual ceiling), and raw
llama-cpp-python with the task's grammar applied to the whole vocabulary every step (what
`grammar=`/`response_format` do). Same sampling settings; each run starts from an empty KV cache.
tok/s counts every token written, prompt time included: it is what a validator's clock sees.
Data on stdout (a table, or --json), progress on stderr.

    python scripts/bench.py [--model FILE] [--n-gpu-layers N] [--tasks blueprint,chapters] [--repeat 2]
"""
from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    import llama_cpp  # before numpy: the other order made CUDA model loading segfault (docs/measurements.md)

import argparse
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import Request  # noqa: E402
from backends.grammar import schema_to_gbnf  # noqa: E402
from backends.llama_cpp import LlamaCppBackend  # noqa: E402
from miner import examples  # noqa: E402
from miner.config import LlamaCppSettings  # noqa: E402
from miner.tasks import TASKS, ContractError, Context, parse_json_object  # noqa: E402

log = logging.getLogger("bench")


def gpu_used_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else None


def valid(task: str, text: str, ctx: Context) -> bool:
    try:
        TASKS[task].check(parse_json_object(text), ctx)
    except ContractError:
        return False
    return True


def raw_run(backend: LlamaCppBackend, messages, max_tokens: int, grammar: str | None, seed: int) -> tuple[str, int, float]:
    llm = backend.llm
    llm.reset()
    kwargs = {"grammar": llama_cpp.LlamaGrammar.from_string(grammar, verbose=False)} if grammar else {}
    started = time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                                     top_k=40, repeat_penalty=1.1, seed=seed, **kwargs)
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], time.perf_counter() - started


def miner_run(backend: LlamaCppBackend, messages, max_tokens: int, schema, seed: int) -> tuple[str, int, float]:
    backend.llm.reset()
    backend.seed = seed
    g = backend.generate(Request(messages=messages, max_tokens=max_tokens, deadline=time.monotonic() + 600,
                                 schema=schema))
    return g.text, g.completion_tokens, g.seconds


def bench_task(backend: LlamaCppBackend, task: str, repeat: int) -> list[dict]:
    fields = examples.example_fields(task)
    ctx = Context(**{k: fields[k] for k in ("user_input", "blueprint", "characters", "story_arc", "chapter_ids")})
    spec = TASKS[task]
    messages, schema, budget = spec.messages(ctx), spec.schema(ctx), spec.max_tokens(ctx)
    grammar = schema_to_gbnf(schema)
    prompt = len(backend.prompt_tokens(messages))
    lengths: dict[int, int] = {}  # seed -> tokens the miner wrote: raw free text writes as many

    def miner(seed: int):
        text, n, s = miner_run(backend, messages, budget, schema, seed)
        lengths[seed] = n
        return text, n, s

    paths = [("miner (lazy grammar + forced batches)", miner),
             ("raw llama.cpp, free text, same length", lambda s: raw_run(backend, messages, lengths[s], None, s)),
             ("raw llama.cpp, grammar every step", lambda s: raw_run(backend, messages, budget, grammar, s))]
    rows = []
    for name, run in paths:
        speeds, seconds, tokens, ok = [], [], [], 0
        for seed in range(repeat):
            log.info("%s: %s, run %d", task, name, seed + 1)
            text, n, s = run(seed)
            speeds.append(n / s)
            seconds.append(s)
            tokens.append(n)
            ok += valid(task, text, ctx)
        rows.append({"task": task, "path": name, "prompt_tokens": prompt, "tokens": statistics.median(tokens),
                     "seconds": statistics.median(seconds), "tok_per_s": statistics.median(speeds),
                     "valid": f"{ok}/{repeat}"})
    base = rows[1]["tok_per_s"]
    for row in rows:
        row["vs_raw_free"] = row["tok_per_s"] / base if base else 0.0
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded demo model)")
    parser.add_argument("--n-gpu-layers", default="auto", help="auto, -1, or a count")
    parser.add_argument("--n-ctx", default="auto")
    parser.add_argument("--n-threads", type=int)
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda v: v.split(","),
                        help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if unknown := set(args.tasks) - set(TASKS):
        parser.error(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    as_int = lambda v: v if v == "auto" else int(v)  # noqa: E731
    settings = LlamaCppSettings(type="llama_cpp", name="bench", model_path=args.model, n_threads=args.n_threads,
                                n_gpu_layers=as_int(args.n_gpu_layers), n_ctx=as_int(args.n_ctx))
    gpu_before = gpu_used_mib()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    backend = LlamaCppBackend.from_settings(settings)
    load_s = time.perf_counter() - started
    gpu_after = gpu_used_mib()
    info = backend.info()
    header = {"model": info.name, **info.parameters, "load_seconds": round(load_s, 2),
              "rss_added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) // 1024,
              "vram_added_mib": gpu_after - gpu_before if gpu_after is not None else None,
              "n_threads": backend.llm.n_threads}
    rows = [row for task in args.tasks for row in bench_task(backend, task, args.repeat)]
    backend.close()
    if args.json:
        json.dump({"setup": header, "runs": rows}, sys.stdout, indent=2)
        print()
        return 0
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'task':<11}{'path':<40}{'prompt':>7}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'vs raw free':>13}{'valid':>7}")
    for r in rows:
        print(f"{r['task']:<11}{r['path']:<40}{r['prompt_tokens']:>7}{r['tokens']:>8.0f}{r['seconds']:>9.2f}"
              f"{r['tok_per_s']:>8.1f}{r['vs_raw_free']:>12.2f}x{r['valid']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
