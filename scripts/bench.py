"""Speed of the miner's llama.cpp path against raw llama.cpp on the same model, in the same run.

1. Per task, one answer at a time: the miner's backend (llguidance holding every token to the task's schema,
   schema-forced text evaluated in batches) against raw llama-cpp-python writing free text of the same
   length (no constraint: the usual ceiling). Same prompt and sampling; every run starts from an empty KV
   cache; tok/s counts every token written, prompt time included: what a validator's clock sees.
   (llama-cpp-python's own JSON-schema grammar is not a row: it cannot compile these schemas' long
   strings, facts.md.) Raw llama.cpp runs in a process of its own: llama.cpp's OpenMP workers slow
   down a second thread that decodes in the same process (docs/measurements.md).
2. Batching: the same requests (a validators' Chinese request, full size) with 1, 2 and 4 decoding at
   once; total completion tokens a second against 1 at a time, and each step's time with the part that is
   not llama_decode (the engine's Python: masks, sampling, bookkeeping). Beside them, raw llama.cpp on
   this machine: a bare low-level loop doing the same work (the same prompts, each answer as many
   free tokens as the miner's, one llama_decode a step, a request joining as another leaves), and a bare
   loop decoding 1, 2 and 4 sequences of free text with no prompts at all (the decode ceiling).
4. Steps: ms per llama_decode for the batch shapes the engine's steps have (consecutive sequence ids or a
   gap, forced text, a prompt chunk), with a KV stream per sequence and with one unified cache.
3. A burst: 4 identical requests at once, as the 3.2.1 validators of one block send them, served as
   the miner serves them (sized to the validators' clock), with the engine's prefix sharing off and on
   (the prompt evaluated once, its KV cells copied), in the order off, on, on, off: refusals, time to
   the first token, total time, and how many answers differ (each is sampled with its own seed).
Data on stdout (a table, or --json), progress on stderr.

    python scripts/bench.py [--model FILE] [--vram-gb 6] [--tasks blueprint,chapters] [--repeat 2]
"""
from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    import llama_cpp  # before numpy: the other order made CUDA model loading segfault (facts.md)

import argparse
import json
import logging
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import llama_lowlevel as ll  # noqa: E402
from backends.base import BackendBusy, BackendError, Generation, Request  # noqa: E402
from backends.chain import BackendState, Chain  # noqa: E402
from backends.llama_cpp import LlamaCppBackend, default_threads  # noqa: E402
from miner import examples  # noqa: E402
from backends.llama_cpp import LlamaCppSettings  # noqa: E402
from miner.config import GenerationSettings  # noqa: E402
from miner.service import VALIDATOR_TIMEOUT_S, StoryService, prepare  # noqa: E402
from miner.tasks import TASKS, ContractError, Context, parse_json_object  # noqa: E402
from miner.tasks.common import language_sample  # noqa: E402

log = logging.getLogger("bench")
CONCURRENCY = (1, 2, 4)


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


def context_of(fields: dict) -> Context:
    return prepare(fields, GenerationSettings())[1]


def full_size_request(fields: dict) -> Request:
    """The task's request at full size: no resizing, so every run is asked for the same answer."""
    spec, ctx = TASKS[fields["task_type"]], context_of(fields)
    schema = spec.schema(ctx)
    return Request(messages=spec.messages(ctx, "auto", schema), max_tokens=spec.max_tokens(ctx),
                   deadline=time.monotonic() + 3600, schema=schema,
                   language_sample=language_sample(ctx.user_input, "auto"))


def miner_run(backend: LlamaCppBackend, fields: dict, seed: int) -> tuple[str, int, float]:
    backend.engine.forget_cached()
    backend.seed = seed
    g = backend.generate(full_size_request(fields))
    return g.text, g.completion_tokens, g.seconds


def raw_run(llm, messages, max_tokens: int, seed: int) -> tuple[str, int, float]:
    llm.reset()
    started = time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                                     top_k=40, repeat_penalty=1.1, seed=seed)
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], time.perf_counter() - started


def row(task: str, path: str, prompt: int, runs: list[tuple[str, int, float]], ctx: Context) -> dict:
    return {"task": task, "path": path, "prompt_tokens": prompt,
            "tokens": statistics.median(n for _, n, _ in runs), "seconds": statistics.median(s for _, _, s in runs),
            "tok_per_s": statistics.median(n / s for _, n, s in runs),
            "valid": f"{sum(valid(task, t, ctx) for t, _, _ in runs)}/{len(runs)}"}


def raw_worker(jobs_file: Path) -> int:
    """Raw llama.cpp, in this process of its own: the job file says what, results go to stdout."""
    jobs = json.loads(jobs_file.read_text())
    load = jobs["load"]
    kv = llama_cpp.GGML_TYPE_Q8_0 if load["kv_cache_type"] == "q8_0" else None
    llm = llama_cpp.Llama(**{k: v for k, v in load.items() if k != "kv_cache_type"}, type_k=kv, type_v=kv,
                          verbose=False)
    try:
        runs = [raw_run(llm, run["messages"], run["max_tokens"], run["seed"]) for run in jobs["runs"]]
    finally:
        llm.close()
    steps = jobs["bare_steps"]
    work = jobs["same_work"]
    bare = with_ratios([same_work_loop(load, work, n, jobs["kv_unified"]) for n in CONCURRENCY]) if work else []
    bare += bare_loop(load["model_path"], load["n_gpu_layers"], load["n_threads"], steps) if steps else []
    shapes = (step_shapes(load["model_path"], load["n_gpu_layers"], load["n_threads"], load["flash_attn"],
                          jobs["step_cells"], STEP_REPEATS) if jobs["step_cells"] else [])
    json.dump({"runs": runs, "bare": bare, "steps": shapes}, sys.stdout)
    return 0


def raw_llama_cpp(backend: LlamaCppBackend, n_threads: int, runs: list[dict], bare_steps: int,
                  same_work: list[tuple[list[int], int]], step_cells: int) -> dict:
    plan = backend.plan  # the miner's own plan: the same layers, context and cache type
    load = {"model_path": str(backend.path), "n_gpu_layers": plan.n_gpu_layers, "n_ctx": plan.n_ctx,
            "flash_attn": plan.flash_attn, "n_threads": n_threads, "kv_cache_type": plan.kv_cache_type}
    log.info("raw llama.cpp: %d runs and the bare loops, in a process of its own", len(runs))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"load": load, "runs": runs, "bare_steps": bare_steps, "same_work": same_work,
                   "kv_unified": backend.ctx.kv_unified, "step_cells": step_cells}, f)
        f.flush()
        out = subprocess.run([sys.executable, __file__, "--raw-jobs", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the raw llama.cpp runs failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def bench_tasks(backend: LlamaCppBackend, tasks: list[str], repeat: int) -> tuple[dict, list[dict]]:
    """The miner's runs of each task with its prompt's length, and the raw runs to match them (same prompt,
    seed and length)."""
    mine, runs = {}, []
    for task in tasks:
        messages = full_size_request(examples.example_fields(task)).messages
        log.info("%s: the miner, %d runs", task, repeat)
        mine[task] = ([miner_run(backend, examples.example_fields(task), seed) for seed in range(repeat)],
                      len(backend.prompt_tokens(messages)))
        runs += [{"task": task, "messages": messages, "max_tokens": n, "seed": seed}
                 for seed, (_, n, _) in enumerate(mine[task][0])]
    return mine, runs


def task_rows(mine: dict, runs: list[dict], raw: list) -> list[dict]:
    rows = []
    for task, (ours, prompt) in mine.items():
        ctx = context_of(examples.example_fields(task))
        theirs = [r for r, run in zip(raw, runs) if run["task"] == task]
        rows += [row(task, "miner (llguidance + forced batches)", prompt, ours, ctx),
                 row(task, "raw llama.cpp, free text, same length", prompt, theirs, ctx)]
        base = rows[-1]["tok_per_s"]
        for r in rows[-2:]:
            r["vs_raw_free"] = r["tok_per_s"] / base if base else 0.0
    return rows


def bench_batching(backend: LlamaCppBackend, task: str, requests: int) -> list[dict]:
    fields = [examples.validator_fields(task, examples.VALIDATOR_PROMPTS[i % 8]) for i in range(requests)]
    rows = []
    for at_once in CONCURRENCY:
        if at_once > backend.parallel:
            log.warning("skipping %d at once: the backend decodes at most %d together", at_once, backend.parallel)
            continue
        backend.engine.forget_cached()
        log.info("batching: %d %s requests, %d at once", requests, task, at_once)
        stats = dict(backend.engine.stats)
        started = time.perf_counter()
        with ThreadPoolExecutor(at_once) as pool:
            done = list(pool.map(lambda f: backend.generate(full_size_request(f)), fields))
        seconds = time.perf_counter() - started
        steps, step_s, decode_s, prepares, prepare_s = (backend.engine.stats[k] - stats[k] for k in (
            "steps", "step_s", "decode_s", "prepares", "prepare_s"))
        tokens = sum(g.completion_tokens for g in done)
        ok = sum(valid(task, g.text, context_of(f)) for g, f in zip(done, fields))
        rows.append({"path": f"miner, {requests} {task} requests", "at_once": at_once, "tokens": tokens,
                     "seconds": seconds, "tok_per_s": tokens / seconds, "valid": f"{ok}/{requests}",
                     "ms_per_step": 1000 * step_s / steps, "python_ms_per_step": 1000 * (step_s - decode_s) / steps,
                     "admission_ms": 1000 * prepare_s / max(prepares, 1),
                     "work": [(backend.prompt_tokens(full_size_request(f).messages), g.completion_tokens)
                              for f, g in zip(fields, done)]})
    return with_ratios(rows)


def bench_burst(backend: LlamaCppBackend, task: str, size: int) -> list[dict]:
    """Identical requests served as a miner serves validators: sized to their clock (55 s limit, 25 s target)."""
    fields = examples.validator_fields(task, examples.VALIDATOR_PROMPTS[0])
    service = StoryService(Chain([BackendState(backend, "local")]), GenerationSettings())
    spec, ctx = service.prepare(fields)
    settings = service.settings

    def serve(_: int) -> Generation | BackendError:
        now = time.monotonic()
        hard = VALIDATOR_TIMEOUT_S - settings.response_margin_s
        try:
            return backend.generate(service.request_for(spec, ctx, now + hard, now + settings.target_s))
        except BackendError as e:  # refused as busy, or past the hard limit: what a validator would get
            return e

    rows, seed = [], backend.seed
    backend.seed = None  # a fresh seed each, as when serving
    for sharing in (False, True, True, False):  # ABBA: what the first bursts teach the planner evens out
        backend.engine.share_prefixes = sharing
        backend.engine.forget_cached()
        log.info("burst: %d identical %s requests, prefix sharing %s", size, task, "on" if sharing else "off")
        started = time.perf_counter()
        with ThreadPoolExecutor(size) as pool:
            served = list(pool.map(serve, range(size)))
        seconds = time.perf_counter() - started
        done = [g for g in served if isinstance(g, Generation)]
        first = [g.first_token_s for g in done if g.first_token_s is not None] or [math.nan]
        rows.append({"sharing": sharing, "requests": size,
                     "refused": sum(isinstance(g, BackendBusy) for g in served),
                     "failed": [str(g) for g in served
                                if isinstance(g, BackendError) and not isinstance(g, BackendBusy)],
                     "prompt_tokens": done[0].prompt_tokens if done else 0,
                     "reused_tokens": sum(g.cached_tokens for g in done),
                     "first_token_mean_s": statistics.mean(first), "first_token_max_s": max(first),
                     "seconds": seconds, "tokens": sum(g.completion_tokens for g in done),
                     "distinct": len({g.text for g in done}),
                     "valid": f"{sum(valid(task, g.text, ctx) for g in done)}/{len(done)}"})
    backend.seed, backend.engine.share_prefixes = seed, True
    return rows


def same_work_loop(load: dict, work: list[tuple[list[int], int]], at_once: int, kv_unified: bool) -> dict:
    """Raw llama.cpp doing the miner's work: each request's prompt, then as many free tokens as the miner
    wrote for it, `at_once` sequences a step, one llama_decode a step (a joining prompt in the same batch,
    split only where it overflows n_batch), the lowest free sequence id for each newcomer."""
    model = ll.Model(Path(load["model_path"]), load["n_gpu_layers"])
    longest = max(len(p) + n for p, n in work)
    ctx = ll.Context(model, n_ctx=at_once * (longest + 64), n_batch=512, n_seq_max=at_once,
                     flash_attn=load["flash_attn"], kv_cache_type=load["kv_cache_type"], n_threads=load["n_threads"],
                     kv_unified=kv_unified)
    batch = ll.Batch(512)
    queue = list(enumerate(work))
    running: dict[int, dict] = {}  # seq -> {left, pos, chain, pending}
    tokens = steps = 0
    started = time.perf_counter()
    while queue or running:
        for seq in range(at_once):
            if seq not in running and queue:
                i, (prompt, n) = queue.pop(0)
                ctx.forget(seq)
                running[seq] = {"left": n, "pos": 0, "pending": list(prompt),
                                "chain": ll.SamplerChain(model.n_vocab, temperature=0.8, top_p=0.95,
                                                         repeat_penalty=1.1, seed=i)}
        batch.clear()
        rows = {}
        for seq, r in sorted(running.items()):
            part = r["pending"][:batch.capacity - batch.n]
            if not part:
                continue
            row = batch.add(part, seq, r["pos"], logits_last=len(part) == len(r["pending"]))
            r["pos"] += len(part)
            r["pending"] = r["pending"][len(part):]
            if not r["pending"]:
                rows[seq] = row
        ctx.decode(batch)
        steps += 1
        for seq, row in rows.items():
            r = running[seq]
            r["pending"] = [r["chain"].sample(ctx, row)]
            r["left"] -= 1
            tokens += 1
            if r["left"] <= 0:
                r["chain"].close()
                del running[seq]
    seconds = time.perf_counter() - started
    batch.close()
    ctx.close()
    model.close()
    return {"path": f"bare loop, the same {len(work)} requests", "at_once": at_once, "tokens": tokens,
            "seconds": seconds, "tok_per_s": tokens / seconds, "valid": "-", "ms_per_step": 1000 * seconds / steps}


def bare_loop(model_path: str, n_gpu_layers: int, n_threads: int, steps: int) -> list[dict]:
    """The ceiling: a bare low-level loop, one llama_decode a step for all sequences, free sampling."""
    model = ll.Model(Path(model_path), n_gpu_layers)
    start = model.tokenize("Once upon a time, in a quiet harbour town,", add_special=False, parse_special=False)
    rows = []
    for n in CONCURRENCY:
        ctx = ll.Context(model, n_ctx=max(CONCURRENCY) * 1024, n_batch=512, n_seq_max=max(CONCURRENCY),
                         flash_attn=False, kv_cache_type="f16", n_threads=n_threads)
        batch = ll.Batch(512)
        chains = [ll.SamplerChain(model.n_vocab, temperature=0.8, top_p=0.95, repeat_penalty=1.0, seed=s)
                  for s in range(n)]
        rows_of = [batch.add(start, s, 0, logits_last=True) for s in range(n)]
        ctx.decode(batch)
        started = time.perf_counter()
        for step in range(steps):
            tokens = [chain.sample(ctx, row) for chain, row in zip(chains, rows_of)]
            batch.clear()
            rows_of = [batch.add([t], s, len(start) + step, logits_last=True) for s, t in enumerate(tokens)]
            ctx.decode(batch)
        seconds = time.perf_counter() - started
        rows.append({"path": f"bare llama.cpp loop, {steps} steps", "at_once": n, "tokens": n * steps,
                     "seconds": seconds, "tok_per_s": n * steps / seconds, "valid": "-"})
        for chain in chains:
            chain.close()
        batch.close()
        ctx.close()
    model.close()
    return with_ratios(rows)


STEP_REPEATS = 12
# Each shape: (sequence id, tokens it adds) for one llama_decode, as the engine's steps have them.
STEP_SHAPES = {
    "1 sequence": [(0, 1)],
    "2, ids 0+1": [(0, 1), (1, 1)],
    "2, ids 0+2 (a gap)": [(0, 1), (2, 1)],
    "4, ids 0-3": [(0, 1), (1, 1), (2, 1), (3, 1)],
    "3, ids 0+1+3 (a gap)": [(0, 1), (1, 1), (3, 1)],
    "2, 1 and 4 tokens (forced text)": [(0, 1), (1, 4)],
    "3 + a 32-token prompt chunk": [(0, 1), (1, 1), (2, 1), (3, 32)],
}


def step_shapes(model_path: str, n_gpu_layers: int, n_threads: int, flash_attn: bool, cells: int,
                steps: int) -> list[dict]:
    """ms per llama_decode for each shape, with a KV stream per sequence and with one unified cache: 4
    sequences hold `cells` prompt cells each; every shape runs `steps` times after one untimed decode,
    and its cells are dropped again, so each shape sees the same contexts."""
    model = ll.Model(Path(model_path), n_gpu_layers)
    prompt = (model.tokenize("Once upon a time, in a quiet harbour town, " * (cells // 8 + 1), add_special=False,
                             parse_special=False))[:cells]
    rows = []
    for unified in (False, True):
        ctx = ll.Context(model, n_ctx=4 * (cells + 512), n_batch=512, n_seq_max=4, flash_attn=flash_attn,
                         kv_cache_type="f16", n_threads=n_threads, kv_unified=unified)
        batch = ll.Batch(512)
        for seq in range(4):
            batch.clear()
            batch.add(prompt, seq, 0, logits_last=True)
            ctx.decode(batch)
        row = {"kv": "unified" if unified else "a stream per sequence", "flash_attn": flash_attn}
        for name, shape in STEP_SHAPES.items():
            times = []
            for k in range(steps + 1):
                batch.clear()
                for seq, n in shape:
                    batch.add(prompt[k:k + n], seq, cells + k * n, logits_last=True)
                started = time.perf_counter()
                ctx.decode(batch)
                times.append(time.perf_counter() - started)
            for seq, _ in shape:
                ctx.forget(seq, cells)
            row[name] = statistics.median(times[1:]) * 1000
        rows.append(row)
        batch.close()
        ctx.close()
    model.close()
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["vs_one_at_a_time"] = r["tok_per_s"] / rows[0]["tok_per_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded demo model)")
    parser.add_argument("--n-gpu-layers", default="auto", help="auto, -1, or a count")
    parser.add_argument("--vram-gb", type=float, help="plan offload for this much VRAM (default: what is free)")
    parser.add_argument("--n-ctx", default=str(4096 * max(CONCURRENCY)),
                        help="KV cache tokens, shared by the 4 sequences (default: 4096 each)")
    parser.add_argument("--n-threads", type=int)
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda v: [t for t in v.split(",") if t],
                        help=f"comma-separated, from {', '.join(TASKS)}; empty: none")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-task", default="blueprint", choices=list(TASKS),
                        help="the validators' request the batching rows send (default: blueprint)")
    parser.add_argument("--batch-requests", type=int, default=12, help="requests per batching row; 0 skips them")
    parser.add_argument("--burst", type=int, default=4, help="identical requests in the burst rows; 0 skips them")
    parser.add_argument("--burst-task", default="chapters", choices=list(TASKS),
                        help="the validators' 3.2.1 request the burst sends (default: chapters, the longest prompt)")
    parser.add_argument("--bare-steps", type=int, default=200, help="steps of the bare loop's rows; 0 skips them")
    parser.add_argument("--step-cells", type=int, default=400,
                        help="KV cells each sequence holds in the step rows (about a validator's prompt); 0 skips them")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--raw-jobs", type=Path, help=argparse.SUPPRESS)  # the raw runs' own process
    args = parser.parse_args(argv)
    if args.raw_jobs:
        return raw_worker(args.raw_jobs)
    if unknown := set(args.tasks) - set(TASKS):
        parser.error(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    as_int = lambda v: v if v == "auto" else int(v)  # noqa: E731
    settings = LlamaCppSettings(type="llama_cpp", name="bench", model_path=args.model, n_threads=args.n_threads,
                                n_gpu_layers=as_int(args.n_gpu_layers), n_ctx=as_int(args.n_ctx),
                                vram_gb=args.vram_gb, parallel=max(CONCURRENCY))
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
              "n_threads": settings.n_threads or default_threads(), "measured": backend.engine.speed.snapshot()}
    mine, runs = bench_tasks(backend, args.tasks, args.repeat)
    batch_rows = bench_batching(backend, args.batch_task, args.batch_requests) if args.batch_requests else []
    burst_rows = bench_burst(backend, args.burst_task, args.burst) if args.burst else []
    backend.close()
    same_work = batch_rows[-1].pop("work") if batch_rows else []  # the most at once: what the ratio is about
    for r in batch_rows:
        r.pop("work", None)
    raw = raw_llama_cpp(backend, header["n_threads"], runs, args.bare_steps if batch_rows else 0, same_work,
                        args.step_cells)
    rows = task_rows(mine, runs, [tuple(r) for r in raw["runs"]])
    batch_rows += raw["bare"]
    if args.json:
        json.dump({"setup": header, "tasks": rows, "batching": batch_rows, "burst": burst_rows,
                   "steps": raw["steps"]}, sys.stdout, indent=2)
        print()
        return 0
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    if rows:
        print(f"{'task':<11}{'path':<40}{'prompt':>7}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'vs raw free':>13}"
              f"{'valid':>7}")
        for r in rows:
            print(f"{r['task']:<11}{r['path']:<40}{r['prompt_tokens']:>7}{r['tokens']:>8.0f}{r['seconds']:>9.2f}"
                  f"{r['tok_per_s']:>8.1f}{r['vs_raw_free']:>12.2f}x{r['valid']:>7}")
    if batch_rows:
        print(f"\nbatching: total tokens a second with 1, 2 and 4 decoding at once ({args.batch_task}: the "
              f"validators' Chinese request, full size)")
        print(f"{'path':<40}{'at once':>8}{'tokens':>8}{'seconds':>9}{'total tok/s':>13}{'vs 1 at a time':>16}"
              f"{'valid':>7}{'ms/step':>9}{'python ms/step':>16}")
        for r in batch_rows:
            step = f"{r['ms_per_step']:>9.1f}" if "ms_per_step" in r else f"{'-':>9}"
            python = f"{r['python_ms_per_step']:>16.1f}" if "python_ms_per_step" in r else f"{'-':>16}"
            print(f"{r['path']:<40}{r['at_once']:>8}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tok_per_s']:>13.1f}"
                  f"{r['vs_one_at_a_time']:>15.2f}x{r['valid']:>7}{step}{python}")
        for r in batch_rows:
            if "admission_ms" in r:
                print(f"miner at {r['at_once']} at once: admitting a request (sizing, prompt, constraint) took "
                      f"{r['admission_ms']:.1f} ms on the engine thread")
        same = {r["at_once"]: r["tok_per_s"] for r in batch_rows if r["path"].startswith("bare loop, the same")}
        for r in batch_rows:
            if r["path"].startswith("miner") and r["at_once"] in same:
                print(f"miner at {r['at_once']} at once: {r['tok_per_s'] / same[r['at_once']]:.2f}x the bare loop "
                      f"doing the same work")
    if raw["steps"]:
        names = list(STEP_SHAPES)
        print(f"\nsteps: ms per llama_decode, {args.step_cells} KV cells a sequence (median of {STEP_REPEATS})")
        print(f"{'shape':<34}" + "".join(f"{r['kv'] + (', flash attn' if r['flash_attn'] else ''):>26}"
                                          for r in raw["steps"]))
        for name in names:
            print(f"{name:<34}" + "".join(f"{r[name]:>26.1f}" for r in raw["steps"]))
    if burst_rows:
        print(f"\nburst: {args.burst} identical {args.burst_task} requests at once (the validators of one block)")
        print(f"{'prefix sharing':<16}{'refused':>8}{'failed':>7}{'prompt':>7}{'reused':>8}{'1st token mean':>16}"
              f"{'1st token max':>15}{'seconds':>9}{'tokens':>8}{'distinct':>10}{'valid':>7}")
        for r in burst_rows:
            print(f"{'on' if r['sharing'] else 'off':<16}{r['refused']:>8}{len(r['failed']):>7}"
                  f"{r['prompt_tokens']:>7}{r['reused_tokens']:>8}{r['first_token_mean_s']:>15.2f}s"
                  f"{r['first_token_max_s']:>14.2f}s{r['seconds']:>9.2f}"
                  f"{r['tokens']:>8}{r['distinct']:>10}{r['valid']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
