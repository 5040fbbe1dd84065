"""Speed of the miner's llama.cpp path against raw llama.cpp on the same model, in the same run.

1. Per task, one answer at a time: the miner's backend (llguidance holding every token to the task's schema,
   schema-forced text evaluated in batches) against raw llama-cpp-python writing free text of the same
   length (no constraint: the usual ceiling). Same prompt and sampling; every run starts from an empty KV
   cache; tok/s counts every token written, prompt time included: what a validator's clock sees.
   (llama-cpp-python's own JSON-schema grammar is not a row: it cannot compile these schemas' long
   strings, docs/measurements.md.) Raw llama.cpp runs in a process of its own: llama.cpp's OpenMP workers slow
   down a second thread that decodes in the same process (docs/measurements.md).
2. Batching: the same requests (a validators' Chinese request, full size) with 1, 2 and `parallel` decoding
   at once; total completion tokens a second against 1 at a time, and each step's time with the part that
   is not llama_decode (the engine's Python: masks, sampling, bookkeeping). Beside each, raw llama.cpp on
   this machine: a bare low-level loop doing the same work (the same prompts, each answer as many free
   tokens as the miner wrote in that row, one llama_decode a step, a request joining as another leaves),
   and a bare loop decoding 1, 2 and `parallel` sequences of free text with no prompts (the decode ceiling).
3. A burst: 4 identical requests at once, as the 3.2.1 validators of one block send them, served as
   the miner serves them (sized to the validators' clock), with the engine's prefix sharing off and on
   (the prompt evaluated once, its KV cells copied), in the order off, on, on, off: refusals, time to
   the first token, total time, and how many answers differ (each is sampled with its own seed).
4. Steps: ms per llama_decode for the batch shapes the engine's steps have (consecutive sequence ids or a
   gap, forced text, a prompt chunk), with a KV stream per sequence and with one unified cache.
Every row is printed the moment it is measured (and appended to --rows FILE as a JSON line), so a run cut
short keeps what it measured; the miner's rows come first, then raw llama.cpp's, each with its ratio.
Data on stdout (a table, or --json at the end), progress on stderr.

    storynet-miner bench [--model FILE] [--vram-gb 6] [--tasks blueprint,chapters] [--repeat 2]
"""
from __future__ import annotations

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
from typing import Any

import llama_cpp

from backends import llama_lowlevel as ll
from backends.base import Dry, Request
from backends.chain import BackendState, Chain
from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from models.host import default_threads
from backends.llama_process import LlamaCppProcess
from miner import examples
from miner.config import GenerationSettings
from miner.contract import error_of
from miner.errors import ConfigError, MinerError
from miner.score import score
from miner.service import StoryService, prepare
from miner.tasks import TASKS, ContractError, Context, parse_json_object
from miner.tasks.common import language_sample

log = logging.getLogger("bench")
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

# How each section's rows print: (key, heading, width, format); a missing value prints as "-".
COLUMNS: dict[str, list[tuple[str, str, int, str]]] = {
    "task": [("task", "task", 11, "<"), ("path", "path", 40, "<"), ("prompt_tokens", "prompt", 7, ">"),
             ("tokens", "tokens", 8, ">.0f"), ("seconds", "seconds", 9, ">.2f"), ("tok_per_s", "tok/s", 8, ">.1f"),
             ("vs_raw_free", "vs raw free", 12, ">.2f"), ("valid", "valid", 7, ">"),
             ("refused_draws", "refused draws", 15, ">.1%"), ("score", "score", 7, ">.1f")],
    "batching": [("path", "path", 40, "<"), ("at_once", "at once", 8, ">"), ("tokens", "tokens", 8, ">"),
                 ("seconds", "seconds", 9, ">.2f"), ("tok_per_s", "total tok/s", 13, ">.1f"),
                 ("vs_one_at_a_time", "vs 1 at a time", 16, ">.2f"), ("vs_same_work", "vs same work", 14, ">.2f"),
                 ("valid", "valid", 7, ">"), ("ms_per_step", "ms/step", 9, ">.1f"),
                 ("python_ms_per_step", "python ms/step", 16, ">.1f"), ("admission_ms", "admit ms", 10, ">.1f")],
    "burst": [("sharing", "prefix sharing", 16, "<"), ("refused", "refused", 8, ">"), ("failed", "failed", 7, ">"),
              ("prompt_tokens", "prompt", 7, ">"), ("reused_tokens", "reused", 8, ">"),
              ("first_token_mean_s", "1st token mean", 16, ">.2f"), ("first_token_max_s", "1st token max", 15, ">.2f"),
              ("seconds", "seconds", 9, ">.2f"), ("tokens", "tokens", 8, ">"), ("distinct", "distinct", 10, ">"),
              ("valid", "valid", 7, ">")],
    "steps": [("kv", "KV cache", 24, "<"), ("flash_attn", "flash attn", 11, ">"),
              *((name, name, len(name) + 2, ">.1f") for name in STEP_SHAPES)],
}
TITLES = {
    "task": "one answer at a time: the miner against raw llama.cpp free text of the same length",
    "batching": "batching: total tokens a second, 1, 2 and `parallel` requests decoding at once",
    "burst": "burst: identical requests at once (the validators of one block)",
    "steps": f"steps: ms per llama_decode (median of {STEP_REPEATS})",
}


class Rows:
    """Every row the moment it is measured: a table line on stdout (the section's heading before its first
    row), a JSON line appended to `rows_file`; with `as_json`, one JSON document at the end instead."""

    def __init__(self, as_json: bool, rows_file: Path | None):
        self.as_json, self.rows_file = as_json, rows_file
        self.sections: dict[str, list[dict]] = {}
        self.printing = ""  # the section whose heading was printed last
        if rows_file:
            rows_file.write_text("")

    def add(self, section: str, row: dict) -> None:
        self.sections.setdefault(section, []).append(row)
        if self.rows_file:
            with self.rows_file.open("a") as f:
                f.write(json.dumps({"section": section, **row}, ensure_ascii=False) + "\n")
        if self.as_json:
            return
        if section == "setup":
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            return
        columns = COLUMNS[section]
        if self.printing != section:  # a heading again where a section resumes: raw llama.cpp's rows come later
            self.printing = section
            print(f"\n{TITLES[section]}\n" + "".join(f"{h:{f[0]}{w}}" for _, h, w, f in columns))
        cells = []
        for key, _, width, fmt in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(f"{'-':{fmt[0]}{width}}")
            else:
                cells.append(f"{value:{fmt[0]}{width}{fmt[1:]}}" if fmt[1:] else f"{str(value):{fmt[0]}{width}}")
        print("".join(cells), flush=True)

    def note(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def dump(self) -> None:
        if self.as_json:
            json.dump(self.sections, sys.stdout, indent=2, ensure_ascii=False)
            print()


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


def mean_score(task: str, runs: list[tuple[str, int, float]]) -> float:
    """The runs' mean score of 100 by the subnet's public rules (miner/score.py), each at its own seconds."""
    scores = []
    for text, _, seconds in runs:
        try:
            answer = parse_json_object(text)
        except ContractError:
            answer = None
        scores.append(score(answer, task, seconds, []).total)
    return statistics.mean(scores)


def context_of(fields: dict) -> Context:
    return prepare(fields, GenerationSettings())[1]


IN_PROCESS = "miner (llguidance + forced batches)"
IN_CHILD = "miner, engine in a child process"


def note_process_cost(rows: Rows) -> None:
    """The child process's rows against the same work in this process."""
    task_rows = rows.sections.get("task", [])
    for row in (r for r in task_rows if r["path"] == IN_CHILD):
        own = next(r for r in task_rows if r["path"] == IN_PROCESS and r["task"] == row["task"])
        rows.note(f"{row['task']}, one answer: in a child process {row['tok_per_s'] / own['tok_per_s']:.3f}x the "
                  f"tok/s in the miner's own process")
    batching = rows.sections.get("batching", [])
    for row in (r for r in batching if r["path"].startswith("miner in a child process")):
        own = next(r for r in batching if r["path"].startswith("miner,") and r["at_once"] == row["at_once"])
        rows.note(f"batching, {row['at_once']} at once: in a child process {row['tok_per_s'] / own['tok_per_s']:.3f}x "
                  f"the tok/s in the miner's own process")


def full_size_request(fields: dict, dry: Dry | None = None) -> Request:
    """The task's request at full size: no resizing, so every run is asked for the same answer."""
    spec, ctx = TASKS[fields["task_type"]], context_of(fields)
    schema = spec.schema(ctx)
    return Request(messages=spec.messages(ctx, "auto", schema), max_tokens=spec.max_tokens(ctx),
                   deadline=time.monotonic() + 3600, schema=schema, dry=dry,
                   language_sample=language_sample(ctx.user_input, "auto"))


def miner_dry(settings: GenerationSettings) -> Dry | None:
    """The DRY sampler as the miner samples with it (generation.dry_*)."""
    return (Dry(settings.dry_multiplier, settings.dry_base, settings.dry_allowed_length, settings.dry_last_n)
            if settings.dry_multiplier > 0 else None)


class Levers:
    """What bench does to the engine it measures, in this process or in a process of its own
    (backends/llama_process.py, through the calls that process answers)."""

    def __init__(self, backend: LlamaCppBackend | LlamaCppProcess, dry: Dry | None):
        self.backend = backend
        self.own = isinstance(backend, LlamaCppProcess)
        self.parallel = backend.parallel
        self.dry = dry  # how the answers are sampled: as the miner does, or --no-dry

    def forget_cached(self) -> None:
        self.backend.call("forget_cached") if self.own else self.backend.engine.forget_cached()

    def seed(self, seed: int | None) -> None:
        self.backend.call("set_seed", seed) if self.own else setattr(self.backend, "seed", seed)

    def stats(self) -> dict[str, float]:
        return self.backend.call("stats") if self.own else dict(self.backend.engine.stats)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.backend.call("prompt_tokens", messages) if self.own else self.backend.prompt_tokens(messages)


def miner_run(levers: Levers, fields: dict, seed: int) -> tuple[str, int, float]:
    levers.forget_cached()
    levers.seed(seed)
    g = levers.backend.generate(full_size_request(fields, levers.dry))
    return g.text, g.completion_tokens, g.seconds


def task_row(task: str, path: str, prompt: int, runs: list[tuple[str, int, float]], ctx: Context) -> dict:
    return {"task": task, "path": path, "prompt_tokens": prompt,
            "tokens": statistics.median(n for _, n, _ in runs), "seconds": statistics.median(s for _, _, s in runs),
            "tok_per_s": statistics.median(n / s for _, n, s in runs),
            "valid": f"{sum(valid(task, t, ctx) for t, _, _ in runs)}/{len(runs)}"}


def bench_tasks(levers: Levers, tasks: list[str], repeat: int, rows: Rows, path: str) -> list[dict]:
    """The miner's runs of each task, a row each as it finishes; returns the raw runs to match them (same
    prompt, seed and length)."""
    runs = []
    for task in tasks:
        fields = examples.example_fields(task)
        messages = full_size_request(fields).messages
        log.info("%s: %s, %d runs", task, path, repeat)
        rejected = levers.stats()["rejected_draws"]
        mine = [miner_run(levers, fields, seed) for seed in range(repeat)]
        row = task_row(task, path, len(levers.prompt_tokens(messages)), mine, context_of(fields))
        row["score"] = mean_score(task, mine)
        # the grammar's lazy check: draws it refused (each cost a full mask and a second draw), of the tokens drawn
        row["refused_draws"] = (levers.stats()["rejected_draws"] - rejected) / max(sum(n for _, n, _ in mine), 1)
        rows.add("task", row)
        runs += [{"task": task, "messages": messages, "max_tokens": n, "seed": seed}
                 for seed, (_, n, _) in enumerate(mine)]
    return runs


def bench_batching(levers: Levers, task: str, requests: int, rows: Rows, path: str) -> list[dict]:
    """A row per number at once; returns each row's work (prompt, tokens written) for the same-work loop."""
    fields = [examples.validator_fields(task, examples.VALIDATOR_PROMPTS[i % 8]) for i in range(requests)]
    work = []
    first = None
    for at_once in sorted({1, min(2, levers.parallel), levers.parallel}):
        levers.forget_cached()
        log.info("batching: %d %s requests, %d at once (%s)", requests, task, at_once, path)
        stats = levers.stats()
        started = time.perf_counter()
        with ThreadPoolExecutor(at_once) as pool:
            done = list(pool.map(lambda f: levers.backend.generate(full_size_request(f, levers.dry)), fields))
        seconds = time.perf_counter() - started
        after = levers.stats()
        steps, step_s, decode_s, prepares, prepare_s = (after[k] - stats[k] for k in (
            "steps", "step_s", "decode_s", "prepares", "prepare_s"))
        tokens = sum(g.completion_tokens for g in done)
        ok = sum(valid(task, g.text, context_of(f)) for g, f in zip(done, fields))
        first = first or tokens / seconds
        rows.add("batching", {"path": f"{path}, {requests} {task} requests", "at_once": at_once, "tokens": tokens,
                              "seconds": seconds, "tok_per_s": tokens / seconds,
                              "vs_one_at_a_time": tokens / seconds / first,
                              "valid": f"{ok}/{requests}", "ms_per_step": 1000 * step_s / steps,
                              "python_ms_per_step": 1000 * (step_s - decode_s) / steps,
                              "admission_ms": 1000 * prepare_s / max(prepares, 1)})
        work.append({"at_once": at_once, "work": [(levers.prompt_tokens(full_size_request(f).messages),
                                                   g.completion_tokens) for f, g in zip(fields, done)]})
    return work


def bench_burst(backend: LlamaCppBackend, task: str, size: int, rounds: int, rows: Rows) -> None:
    """Identical requests served as the miner serves validators: through the service, with its deadline
    and sizing for the validators' 60 s, and the contract check."""
    fields = examples.validator_fields(task, examples.VALIDATOR_PROMPTS[0])
    service = StoryService(Chain([BackendState(backend, "local")]), GenerationSettings())
    seed = backend.seed
    backend.seed = None  # a fresh seed each, as when serving
    for sharing in (False, True, True, False)[:rounds]:  # ABBA: what the first bursts teach the planner evens out
        backend.engine.kv.share_prefixes = sharing
        backend.engine.forget_cached()
        log.info("burst: %d identical %s requests, prefix sharing %s", size, task, "on" if sharing else "off")
        started = time.perf_counter()
        with ThreadPoolExecutor(size) as pool:
            answers = list(pool.map(lambda _: service.answer(fields), range(size)))
        seconds = time.perf_counter() - started
        errors = [e for e in map(error_of, (a.output for a in answers)) if e]
        done = [a.generation for a in answers if a.generation is not None]
        first = [g.first_token_s for g in done if g.first_token_s is not None] or [math.nan]
        rows.add("burst", {"task": task, "sharing": "on" if sharing else "off", "requests": size,
                           "refused": sum(kind == "busy" for kind, _ in errors),
                           "failed": sum(kind != "busy" for kind, _ in errors),
                           "failures": [text for kind, text in errors if kind != "busy"],
                           "prompt_tokens": done[0].prompt_tokens if done else 0,
                           "reused_tokens": sum(g.cached_tokens for g in done),
                           "first_token_mean_s": statistics.mean(first), "first_token_max_s": max(first),
                           "seconds": seconds, "tokens": sum(g.completion_tokens for g in done),
                           "distinct": len({g.text for g in done}), "valid": f"{sum(a.ok for a in answers)}/{size}"})
    backend.seed, backend.engine.kv.share_prefixes = seed, True


# --- raw llama.cpp, in a process of its own ------------------------------------------------------------
def raw_run(llm, messages, max_tokens: int, seed: int) -> tuple[str, int, float]:
    llm.reset()
    started = time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                                     top_k=40, repeat_penalty=1.1, seed=seed)
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], time.perf_counter() - started


def prefill(ctx: ll.Context, batch: ll.Batch, tokens: list[int], seq: int) -> None:
    """A prompt of any length, in batches of at most the batch's capacity."""
    for start in range(0, len(tokens), batch.capacity):
        part = tokens[start:start + batch.capacity]
        batch.clear()
        batch.add(part, seq, start, logits_last=start + len(part) == len(tokens))
        ctx.decode(batch)


def same_work_loop(model: ll.Model, load: dict, work: list[tuple[list[int], int]], at_once: int,
                   kv_unified: bool) -> dict:
    """Raw llama.cpp doing the miner's work: each request's prompt, then as many free tokens as the miner
    wrote for it, `at_once` sequences a step, one llama_decode a step (a joining prompt in the same batch,
    split only where it overflows n_batch), the lowest free sequence id for each newcomer."""
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
                                "chain": ll.SamplerChain(temperature=0.8, top_p=0.95,
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
    return {"path": f"bare loop, the same {len(work)} requests", "at_once": at_once, "tokens": tokens,
            "seconds": seconds, "tok_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps}


def bare_loop(model: ll.Model, n_threads: int, n: int, steps: int) -> dict:
    """The ceiling: a bare low-level loop, one llama_decode a step for n sequences, free sampling."""
    start = model.tokenize("Once upon a time, in a quiet harbour town,", add_special=False, parse_special=False)
    ctx = ll.Context(model, n_ctx=n * (steps + 64), n_batch=512, n_seq_max=n, flash_attn=False, kv_cache_type="f16",
                     n_threads=n_threads)
    batch = ll.Batch(512)
    chains = [ll.SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=1.0, seed=s)
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
    for chain in chains:
        chain.close()
    batch.close()
    ctx.close()
    return {"path": f"bare llama.cpp loop, {steps} steps", "at_once": n, "tokens": n * steps, "seconds": seconds,
            "tok_per_s": n * steps / seconds, "ms_per_step": 1000 * seconds / steps}


def step_shapes(model: ll.Model, n_threads: int, flash_attn: bool, cells: int, unified: bool) -> dict:
    """ms per llama_decode for each shape: 4 sequences hold `cells` prompt cells each; every shape runs
    STEP_REPEATS times after one untimed decode, and its cells are dropped again, so each shape sees the same
    contexts."""
    prompt = (model.tokenize("Once upon a time, in a quiet harbour town, " * (cells // 8 + 1), add_special=False,
                             parse_special=False))[:cells]
    ctx = ll.Context(model, n_ctx=4 * (cells + 512), n_batch=512, n_seq_max=4, flash_attn=flash_attn,
                     kv_cache_type="f16", n_threads=n_threads, kv_unified=unified)
    batch = ll.Batch(512)
    for seq in range(4):
        prefill(ctx, batch, prompt, seq)
    row: dict[str, Any] = {"kv": "unified" if unified else "a stream per sequence", "flash_attn": flash_attn,
                           "cells": cells}
    for name, shape in STEP_SHAPES.items():
        times = []
        for k in range(STEP_REPEATS + 1):
            batch.clear()
            for seq, n in shape:
                batch.add(prompt[k:k + n], seq, cells + k * n, logits_last=True)
            started = time.perf_counter()
            ctx.decode(batch)
            times.append(time.perf_counter() - started)
        for seq, _ in shape:
            ctx.forget(seq, cells)
        row[name] = statistics.median(times[1:]) * 1000
    batch.close()
    ctx.close()
    return row


def raw_worker(jobs_file: Path) -> int:
    """Raw llama.cpp, in this process of its own: the job file says what; each result is a JSON line on
    stdout the moment it is measured."""
    jobs = json.loads(jobs_file.read_text())
    load = jobs["load"]

    def emit(kind: str, value: Any) -> None:
        print(json.dumps({"kind": kind, "value": value}), flush=True)

    if jobs["runs"]:
        kv = llama_cpp.GGML_TYPE_Q8_0 if load["kv_cache_type"] == "q8_0" else None
        llm = llama_cpp.Llama(model_path=load["model_path"], n_gpu_layers=load["n_gpu_layers"], n_ctx=load["n_ctx"],
                              flash_attn=load["flash_attn"], n_threads=load["n_threads"], type_k=kv, type_v=kv,
                              use_mmap=load["mmap"], verbose=False)
        try:
            for run in jobs["runs"]:
                emit("run", raw_run(llm, run["messages"], run["max_tokens"], run["seed"]))
        finally:
            llm.close()
    model = ll.Model(Path(load["model_path"]), load["n_gpu_layers"], mmap=load["mmap"], n_cpu_moe=load["n_cpu_moe"])
    try:
        for row in jobs["same_work"]:
            emit("same_work", same_work_loop(model, load, row["work"], row["at_once"], jobs["kv_unified"]))
        for n in jobs["bare_sequences"]:
            emit("bare", bare_loop(model, load["n_threads"], n, jobs["bare_steps"]))
        if jobs["step_cells"]:
            for unified in (False, True):
                emit("steps", step_shapes(model, load["n_threads"], load["flash_attn"], jobs["step_cells"], unified))
    finally:
        model.close()
    return 0


def raw_llama_cpp(backend: LlamaCppBackend, n_threads: int, jobs: dict, rows: Rows) -> None:
    """Run raw llama.cpp's jobs in a process of its own (the miner's model closed first: one model in
    memory at a time, as on a 6 GB card) and add each result's row as it arrives, with its ratio."""
    plan = backend.plan  # the miner's own plan: the same layers, context and cache type
    load = {"model_path": str(backend.path), "n_gpu_layers": plan.n_gpu_layers, "n_ctx": plan.n_ctx,
            "flash_attn": plan.flash_attn, "n_threads": n_threads, "kv_cache_type": plan.kv_cache_type,
            "n_cpu_moe": plan.n_cpu_moe, "mmap": backend.model.mmap}  # the free-text runs keep experts in place
    mine = {r["task"]: r for r in rows.sections.get("task", []) if r["path"] == IN_PROCESS}
    runs_left = list(jobs["runs"])
    by_task: dict[str, list] = {}
    batching = {r["at_once"]: r for r in rows.sections.get("batching", []) if r["path"].startswith("miner,")}
    bare_one = None
    log.info("raw llama.cpp: %d runs and the bare loops, in a process of its own", len(runs_left))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"load": load, **jobs}, f)
        f.flush()
        with subprocess.Popen([sys.executable, "-m", "miner.bench", f.name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                result = json.loads(line)
                kind, value = result["kind"], result["value"]
                if kind == "run":
                    run = runs_left.pop(0)
                    task = run["task"]
                    by_task.setdefault(task, []).append(tuple(value))
                    if not any(r["task"] == task for r in runs_left):
                        row = task_row(task, "raw llama.cpp, free text, same length", mine[task]["prompt_tokens"],
                                       by_task[task], context_of(examples.example_fields(task)))
                        row["vs_raw_free"] = 1.0
                        mine[task]["vs_raw_free"] = mine[task]["tok_per_s"] / row["tok_per_s"]
                        rows.add("task", row)
                        rows.note(f"{task}: the miner at {mine[task]['vs_raw_free']:.2f}x raw llama.cpp free text")
                elif kind == "same_work":
                    ours = batching[value["at_once"]]
                    ours["vs_same_work"] = ours["tok_per_s"] / value["tok_per_s"]
                    one = rows.sections["batching"][0]["tok_per_s"]
                    rows.add("batching", {**value, "vs_one_at_a_time": value["tok_per_s"] / one,
                                          "vs_same_work": 1.0})
                    rows.note(f"miner at {value['at_once']} at once: {ours['vs_same_work']:.2f}x the bare loop doing "
                              f"the same work")
                elif kind == "bare":
                    bare_one = bare_one or value["tok_per_s"]
                    rows.add("batching", {**value, "vs_one_at_a_time": value["tok_per_s"] / bare_one})
                else:
                    rows.add("steps", value)
            error = proc.stderr.read()
    if proc.returncode != 0:
        raise MinerError(f"the raw llama.cpp runs failed:\n{error[-3000:]}")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="GGUF file (default: the embedded demo model)")
    parser.add_argument("--n-gpu-layers", default="auto", help="auto, -1, or a count")
    parser.add_argument("--vram-gb", type=float, help="plan offload for this much VRAM (default: what is free)")
    parser.add_argument("--n-cpu-moe", default="auto", help="MoE: keep the experts of the first N blocks in system "
                        "RAM, as llama.cpp's --n-cpu-moe (the bare loops too, not raw free text); auto: the plan's")
    parser.add_argument("--n-ctx", default="16384", help="KV cache tokens, shared by the sequences (default: 16384)")
    parser.add_argument("--parallel", default="4", help="requests decoding together: a count, or auto (the plan's)")
    parser.add_argument("--n-threads", type=int)
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda v: [t for t in v.split(",") if t],
                        help=f"comma-separated, from {', '.join(TASKS)}; empty: none")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-task", default="blueprint", choices=list(TASKS),
                        help="the validators' request the batching rows send (default: blueprint)")
    parser.add_argument("--batch-requests", type=int, default=12, help="requests per batching row; 0 skips them")
    parser.add_argument("--burst", type=int, default=4, help="identical requests in the burst rows; 0 skips them")
    parser.add_argument("--burst-rounds", type=int, default=4, choices=range(1, 5),
                        help="bursts, sharing off, on, on, off (default: all four; 2: off and on)")
    parser.add_argument("--burst-task", default="chapters", choices=list(TASKS),
                        help="the validators' 3.2.1 request the burst sends (default: chapters, the longest prompt)")
    parser.add_argument("--bare-steps", type=int, default=200, help="steps of the bare loop's rows; 0 skips them")
    parser.add_argument("--step-cells", type=int, default=400,
                        help="KV cells each sequence holds in the step rows (about a validator's prompt); 0 skips them")
    parser.add_argument("--no-dry", action="store_true", help="sample without the DRY sampler (default: with it, "
                        "as the miner samples): what DRY costs a token, against a run with it")
    parser.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                        help="skip the rows that run the one-answer and batching work again with the engine in a "
                             "child process, as the miner serves")
    parser.add_argument("--rows", type=Path, help="also append every row to this file as a JSON line, as it is measured")
    parser.add_argument("--json", action="store_true", help="one JSON document at the end instead of tables")


def command(args: argparse.Namespace) -> int:
    if unknown := set(args.tasks) - set(TASKS):
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    as_int = lambda v: v if v == "auto" else int(v)  # noqa: E731
    settings = LlamaCppSettings(type="llama_cpp", name="bench", model_path=args.model, n_threads=args.n_threads,
                                n_gpu_layers=as_int(args.n_gpu_layers), n_ctx=as_int(args.n_ctx),
                                vram_gb=args.vram_gb, parallel=as_int(args.parallel), n_cpu_moe=as_int(args.n_cpu_moe))
    rows = Rows(args.json, args.rows)
    gpu_before = gpu_used_mib()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    backend = LlamaCppBackend.from_settings(settings)
    load_s = time.perf_counter() - started
    gpu_after = gpu_used_mib()
    info = backend.info()
    n_threads = settings.n_threads or default_threads()
    rows.add("setup", {"model": info.name, **info.parameters, "kv_unified": backend.ctx.kv_unified,
                       "n_cpu_moe": backend.plan.n_cpu_moe, "mmap": backend.model.mmap,
                       "load_seconds": round(load_s, 2),
                       "rss_added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) // 1024,
                       "vram_added_mib": gpu_after - gpu_before if gpu_after is not None else None,
                       "n_threads": n_threads, "measured": backend.engine.speed.snapshot()})
    try:
        dry = None if args.no_dry else miner_dry(GenerationSettings())
        runs = bench_tasks(Levers(backend, dry), args.tasks, args.repeat, rows, IN_PROCESS)
        work = (bench_batching(Levers(backend, dry), args.batch_task, args.batch_requests, rows, "miner")
                if args.batch_requests else [])
        if args.burst:
            bench_burst(backend, args.burst_task, args.burst, args.burst_rounds, rows)
        parallel, kv_unified = backend.parallel, backend.ctx.kv_unified
    finally:
        backend.close()
    if args.engine_process and (args.tasks or args.batch_requests):
        child = LlamaCppProcess(settings)  # the same work through the process boundary the miner serves with
        try:
            bench_tasks(Levers(child, dry), args.tasks, args.repeat, rows, IN_CHILD)
            if args.batch_requests:
                bench_batching(Levers(child, dry), args.batch_task, args.batch_requests, rows,
                               "miner in a child process")
        finally:
            child.close()
        note_process_cost(rows)
    bare = sorted({1, min(2, parallel), parallel}) if args.batch_requests and args.bare_steps else []
    raw_llama_cpp(backend, n_threads, {"runs": runs, "same_work": work, "kv_unified": kv_unified,
                                       "bare_sequences": bare, "bare_steps": args.bare_steps,
                                       "step_cells": args.step_cells}, rows)
    for r in rows.sections.get("batching", []):
        if "admission_ms" in r:
            rows.note(f"{r['path']}, {r['at_once']} at once: admitting a request (sizing, prompt, constraint) took "
                      f"{r['admission_ms']:.1f} ms on the engine thread")
    rows.dump()
    return 0


if __name__ == "__main__":  # `python -m miner.bench JOBS`: raw llama.cpp's runs, in a process of their own
    raise SystemExit(raw_worker(Path(sys.argv[1])))
