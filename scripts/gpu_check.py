"""The GPU proof's steps. scripts/gpu_check.sh runs them on the device machine in two calls:

  call 1, `gpu_check.sh` (at most 8 minutes on 16 cores):
    model    write Llama-3.1-8B's shapes straight in Q4_K_M (random weights), while llama.cpp builds
    prove    the build; `miner fit --vram-gb 6`; a load with that plan (VRAM against the plan), one answer
             per task and `parallel` at once: the engine's learned decode speed beside the rate its answers
             actually ran at; the engine's child process SIGKILLed mid-answer: seconds until it serves
             again, VRAM after the restart against before
  call 2, `gpu_check.sh measure`, right after (the warm machine keeps /tmp; at most 5 minutes):
    measure  `storynet-miner bench` under the 6 GiB plan (its rows in bench_rows.jsonl as each is measured),
             a burst of 4 chapters requests (burst_rows.jsonl), then the 3.2.1 validators' step (`storynet-miner
             loadtest`, 8 validators) against that plan, then, if time is left, against the 4 GiB plan
             (partial offload: a consumer card's speed)
  failed   record a step that failed in the shell (the build), with the end of its log

Results: $OUT/gpu_check.json (every step so far) and $OUT/gpu_check.md (a table), rewritten as each step
finishes, so a call cut short keeps what finished. Each model load runs in a process of its own, so
nvidia-smi sees what that load added and the next one starts from a free card. Without nvidia-smi the
steps still run (no VRAM figures): tests/test_gpu_tools.py rehearses them on the CPU with the tiny shape,
where only the GPU image's packages and the carried ones import.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the steps run from here, with the project on PYTHONPATH

VRAM_GB = 6.0
PARTIAL_VRAM_GB = 4.0  # partial offload: about 45 tok/s on an H100, a 6 GB consumer card's speed
CLOCK_TOLERANCE = 0.15  # the learned decode speed and the answers' rate must agree this well
PLAN = ["--n-ctx", "auto", "--parallel", "auto"]  # the 6 GiB plan's context and parallel, as the miner would run
# In the order the rows matter: one answer per task against raw llama.cpp, batching against the bare loop
# doing the same work, the KV layouts' steps (1000 cells a sequence: a validator's prompt and part of an
# answer); then a burst, in a bench of its own.
BENCH = ["--tasks", "blueprint,characters,story_arc,chapters", "--repeat", "1", "--batch-task", "characters",
         "--batch-requests", "2", "--burst", "0", "--bare-steps", "100", "--step-cells", "1000", "--no-engine-process",
         *PLAN]
BURST = ["--tasks", "", "--batch-requests", "0", "--bare-steps", "0", "--step-cells", "0", "--burst", "4",
         "--burst-rounds", "2", *PLAN]
BURST_S = 40  # what the burst bench needs (load, two bursts of 4 chapters requests)
LOADTEST_START_S = 30  # the miner's start (model load, warm-up) before the validators' first request
LOADTEST_END_S = 10  # the last answers and the miner's shutdown


class Report:
    def __init__(self, out: Path):
        self.json_path, self.md_path = out / "gpu_check.json", out / "gpu_check.md"
        self.steps = json.loads(self.json_path.read_text()) if self.json_path.exists() else []

    def add(self, step: str, ok: bool, seconds: float, summary: str, **data) -> None:
        self.steps.append({"step": step, "ok": ok, "seconds": round(seconds, 1), "summary": summary, **data})
        self.json_path.write_text(json.dumps(self.steps, indent=2, ensure_ascii=False))
        lines = ["| step | ok | seconds | result |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | {s['summary']} |"
                  for s in self.steps]
        self.md_path.write_text("\n".join(lines) + "\n")
        print(f"gpu_check: {step}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s: {summary}", flush=True)


def nvidia_smi(*query: str) -> list[str] | None:
    """The first GPU's answers to an nvidia-smi query; None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [part.strip() for part in out.splitlines()[0].split(",")]


def vram_used_mib() -> int | None:
    used = nvidia_smi("memory.used")
    return int(used[0]) if used else None


def gpu_facts() -> dict:
    facts = nvidia_smi("name", "driver_version", "memory.total", "compute_cap")
    return dict(zip(("gpu", "driver", "memory_total_mib", "compute_capability"), facts)) if facts else {"gpu": None}


class StepFailed(Exception):
    """A step's process failed: the message is its last line (the error), `tail` the end of its log."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def run_json(argv: list[str], timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{' '.join(argv[:3])} did not finish in {timeout:.0f} s") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"{' '.join(argv[:3])} exited {out.returncode}: {last}", out.stderr[-3000:])
    return json.loads(out.stdout)


def model_path(work: Path) -> Path:
    return work / "model-Q4_K_M.gguf"


def cmd_model(args) -> int:
    from models.synthetic import make
    report = Report(args.out)
    started = time.monotonic()
    path = make(model_path(args.work), args.shape, args.vocab)
    report.add("write model", True, time.monotonic() - started,
               f"{args.shape} shapes in Q4_K_M, {path.stat().st_size:,} bytes", **gpu_facts(),
               bytes=path.stat().st_size)
    return 0


def cmd_failed(args) -> int:
    tail = args.log.read_text(errors="replace")[-3000:] if args.log.exists() else ""
    Report(args.out).add(args.step, False, 0.0, f"failed; see {args.log.name}", log_tail=tail)
    return 1


def cmd_prove(args) -> int:
    import llama_cpp  # built a moment ago, with CUDA
    report = Report(args.out)
    offload = llama_cpp.llama_supports_gpu_offload()
    report.add("build", offload, args.build_seconds,
               f"llama-cpp-python {llama_cpp.__version__}, GPU offload {'on' if offload else 'OFF'}")
    model = model_path(args.work)
    steps = [("fit", ["-m", "miner", "fit", "--model", str(model), "--vram-gb", str(VRAM_GB), "--json"], 120),
             ("load and answer", [__file__, "serve", "--model", str(model)], 240),
             ("engine restart", [__file__, "restart", "--model", str(model)], 180)]
    plan = None
    for step, argv, timeout in steps:
        started = time.monotonic()
        try:
            data = run_json(argv, timeout)
        except StepFailed as e:
            report.add(step, False, time.monotonic() - started, str(e)[:300], log_tail=e.tail)
            continue
        seconds = time.monotonic() - started
        if step == "fit":
            plan = data
            report.add(step, True, seconds, f"{data['n_gpu_layers']} layers, n_ctx {data['n_ctx']}, "
                       f"{data['kv_cache_type']} KV, estimate {data['estimated_vram_bytes'] / 2**20:,.0f} MiB",
                       plan=data)
        elif step == "engine restart":
            ok, summary = judge_restart(data)
            report.add(step, ok, seconds, summary, **data)
        else:
            ok, summary = judge_load(data, plan)
            report.add(step, ok, seconds, summary, **data)
            ok, summary = judge_clock(data["clock"])
            report.add("clock", ok, 0.0, summary, clock=data["clock"])
    return 0


def judge_load(data: dict, plan: dict | None) -> tuple[bool, str]:
    """Every answer valid, and the VRAM the load added within 5% of the plan and under the budget."""
    valid = sum(a["valid"] for a in data["answers"])
    answers = (f"{valid}/{len(data['answers'])} answers valid: "
               + ", ".join(f"{a['task']} {a['tokens']} tokens {a['seconds']:.1f} s" for a in data["answers"]))
    measured, budget = data["vram_added_mib"], VRAM_GB * 1024
    estimate = plan["estimated_vram_bytes"] / 2**20 if plan and plan["estimated_vram_bytes"] else None
    if measured is None or estimate is None:
        return valid == len(data["answers"]), f"no VRAM figures (no GPU offload); {answers}"
    off = (measured - estimate) / estimate
    ok = measured <= budget and abs(off) <= 0.05 and valid == len(data["answers"])
    return ok, (f"VRAM added {measured:,} MiB vs plan {estimate:,.0f} MiB ({off:+.1%}), budget {budget:,.0f} MiB; "
                f"{answers}")


def judge_restart(data: dict) -> tuple[bool, str]:
    """Serving again after the kill, its VRAM back where it was (within 5%): nothing left on the card."""
    again = (f"engine process SIGKILLed {data['killed_after_s']:.1f} s into a chapters answer; that answer "
             f"failed in {data['failed_after_s']:.1f} s ({data['error'][:80]}); serving again "
             f"{data['serving_again_s']:.1f} s after the kill; a new answer valid: {data['valid_after']}")
    before, after = data["vram_before_mib"], data["vram_after_mib"]
    if before is None or after is None:
        return data["valid_after"], f"{again}; no VRAM figures (no GPU offload)"
    off = (after - before) / before
    return (data["valid_after"] and abs(off) <= 0.05,
            f"{again}; VRAM in use {before:,} MiB before, {after:,} MiB after the restart ({off:+.1%})")


def judge_clock(clock: dict) -> tuple[bool, str]:
    """The warm-up's learned decode speed against the rate the answers ran at, at 1 and `parallel` sequences."""
    parts, ok = [], True
    for n, row in clock.items():
        off = row["answers_tok_s"] / row["learned_tok_s"] - 1
        ok = ok and abs(off) <= CLOCK_TOLERANCE
        parts.append(f"{n} at once: learned {row['learned_tok_s']:.0f} tok/s, answers ran at "
                     f"{row['answers_tok_s']:.0f} ({off:+.0%})")
    return ok, "; ".join(parts) + f" (agree within {CLOCK_TOLERANCE:.0%})"


def decode_rate(generation) -> float | None:
    """Tokens the answer drew a second, from its first token to its end: a step draws one token per sequence,
    so this is the step rate the answer saw (forced text rides along in the same steps). None for an answer
    that had no steps to speak of."""
    if generation is None or generation.first_token_s is None or generation.seconds <= generation.first_token_s:
        return None
    return (generation.completion_tokens - generation.forced_tokens) / (generation.seconds - generation.first_token_s)


def cmd_serve(args) -> int:
    """In its own process: load with the 6 GiB plan, measure what that added, answer each task once, then
    `parallel` requests at once, and set the rates the answers ran at beside the speed the warm-up learned."""
    before = vram_used_mib()  # before anything of llama.cpp loads
    from backends.chain import BackendState, Chain
    from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
    from miner import examples
    from miner.config import GenerationSettings
    from miner.service import StoryService
    from miner.tasks import TASKS
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="gpu", model_path=str(args.model),
                                                             vram_gb=VRAM_GB))
    added = vram_used_mib() - before if before is not None else None
    learned = backend.engine.speed.snapshot()  # the warm-up's figures, before any answer teaches it more
    service = StoryService(Chain([BackendState(backend, "gpu")]), GenerationSettings())

    def answer(task: str, prompt: int):
        return task, service.answer(examples.validator_fields(task, examples.VALIDATOR_PROMPTS[prompt]))

    batches = [(1, [answer(task, 0) for task in TASKS])]
    if backend.parallel > 1:
        with ThreadPoolExecutor(backend.parallel) as pool:
            batches.append((backend.parallel, list(pool.map(lambda k: answer("characters", k % 8),
                                                            range(backend.parallel)))))
    answers = [{"task": task, "valid": a.ok, "seconds": round(a.seconds, 2), "at_once": at_once,
                "tokens": a.generation.completion_tokens if a.generation else 0,
                "forced": a.generation.forced_tokens if a.generation else 0,
                "tok_s": decode_rate(a.generation), "error": a.output.get("error")}
               for at_once, batch in batches for task, a in batch]
    decoded = {n: [r for _, a in batch if (r := decode_rate(a.generation)) is not None] for n, batch in batches}
    by_n = learned["decode_tok_s_by_sequences"]
    clock = {n: {"learned_tok_s": by_n[n],
                 # one at a time: the typical answer; together: the sum of the answers' rates, all decoding at once
                 "answers_tok_s": statistics.median(rates) if n == 1 else sum(rates)}
             for n, rates in decoded.items() if rates and n in by_n}
    json.dump({"vram_added_mib": added, "plan": backend.info().parameters, "parallel": backend.parallel,
               "learned": learned, "clock": clock, "answers": answers}, sys.stdout)
    backend.close()
    return 0


def cmd_restart(args) -> int:
    """In its own process: the engine in its child process with the 6 GiB plan, SIGKILLed in the middle of a
    chapters answer: how soon the answer fails, how soon a new child serves, and the VRAM in use before the
    kill against after the restart (what the dead child held must come back)."""
    import os
    import signal
    import threading
    from backends.chain import BackendState, Chain
    from backends.llama_cpp import LlamaCppSettings
    from backends.llama_process import LlamaCppProcess
    from miner import examples
    from miner.config import GenerationSettings
    from miner.service import StoryService
    backend = LlamaCppProcess(LlamaCppSettings(type="llama_cpp", name="gpu", model_path=str(args.model), vram_gb=VRAM_GB))
    service = StoryService(Chain([BackendState(backend, "gpu")]), GenerationSettings())
    fields = examples.validator_fields("chapters", examples.VALIDATOR_PROMPTS[0])
    before = vram_used_mib()
    answers: list = []
    asking = threading.Thread(target=lambda: answers.append(service.answer(fields)))
    steps, started = backend.clock.steps, time.monotonic()
    asking.start()
    while backend.clock.steps < steps + 50 and asking.is_alive():  # well into the answer
        time.sleep(0.01)
    killed = time.monotonic()
    os.kill(backend.pid, signal.SIGKILL)
    asking.join(60)
    failed = time.monotonic()
    while not backend.health().ok and time.monotonic() - killed < 150:
        time.sleep(0.2)
    serving = time.monotonic()
    after = vram_used_mib()
    valid = service.answer(fields).ok
    json.dump({"killed_after_s": killed - started, "failed_after_s": failed - killed,
               "error": answers[0].output.get("error", "(it finished first)") if answers else "(no answer)",
               "serving_again_s": serving - killed, "valid_after": valid, "vram_before_mib": before,
               "vram_after_mib": after, "restarts": backend.restarts}, sys.stdout)
    backend.close()
    return 0


def cmd_measure(args) -> int:
    """The rows that settle the GPU design, in the order they matter, each within what is left of the budget
    once the later ones have their share."""
    report = Report(args.out)
    model = model_path(args.work)
    end = time.monotonic() + args.seconds
    loadtest_s = args.loadtest_seconds + LOADTEST_START_S + LOADTEST_END_S
    for name, argv, later in (("bench", args.bench, (BURST_S if args.burst else 0) + loadtest_s),
                              ("burst", args.burst, loadtest_s)):
        if argv:
            report.add(name, *bench(args, model, name, argv, end - time.monotonic() - later))
    for vram in args.plans:
        label = f"validators' step, {vram:g} GiB plan"
        seconds = min(args.loadtest_seconds, end - time.monotonic() - LOADTEST_START_S - LOADTEST_END_S)
        if seconds < args.loadtest_seconds / 2:
            report.add(label, False, 0.0, f"not reached: {max(end - time.monotonic(), 0):.0f} s were left")
            continue
        report.add(label, *loadtest(args, model, vram, seconds))
    return 0


def bench(args, model: Path, name: str, argv: list[str], seconds: float) -> tuple[bool, float, str]:
    """bench.py under the 6 GiB plan: its rows go to $OUT/{name}_rows.jsonl as each is measured, its tables to
    $OUT/bench.txt, its progress to $OUT/measure.log (a device call brings back 8 files at most)."""
    started = time.monotonic()
    rows_file = args.out / f"{name}_rows.jsonl"
    try:
        with (args.out / "bench.txt").open("a") as table, (args.out / "measure.log").open("a") as progress:
            subprocess.run([sys.executable, "-m", "miner", "bench", "--model", str(model), "--vram-gb", str(VRAM_GB),
                            "--rows", str(rows_file), *argv], stdout=table, stderr=progress, cwd=ROOT, check=True,
                           timeout=max(seconds, 20))
        ok, note = True, ""
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        ok, note = False, f"; stopped: {type(e).__name__} (measure.log)"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    return ok, time.monotonic() - started, bench_summary(rows) + note


def loadtest(args, model: Path, vram_gb: float, seconds: float) -> tuple[bool, float, str]:
    """The 3.2.1 validators' step against a miner planned for vram_gb: every request valid?"""
    started = time.monotonic()
    name = f"loadtest-{vram_gb:g}gib"
    config = args.work / f"{name}.yaml"
    config.write_text(json.dumps({"backends": [{"type": "llama_cpp", "name": "local", "model_path": str(model),
                                                "vram_gb": vram_gb}]}))
    argv = ["-m", "miner", "loadtest", "--validators", str(args.validators), "--seconds", f"{seconds:.0f}",
            "--config", str(config), "--json", *args.loadtest]
    try:
        with (args.out / "measure.log").open("a") as progress:
            out = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stderr=progress, text=True,
                                 cwd=ROOT, check=True, timeout=seconds + LOADTEST_START_S + LOADTEST_END_S + 60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return False, time.monotonic() - started, f"{type(e).__name__}; see measure.log"
    (args.out / f"{name}.json").write_text(out.stdout)
    s = json.loads(out.stdout)["summary"]
    p95 = s["answer_p95_s"]
    summary = (f"{s['validators']} validators, {s['seconds']} s, {s['requests']} requests: {s['valid']} valid, "
               f"{s['busy']} busy, {s['error']} errors, {s['invalid']} invalid, {s['no_answer']} no answer; "
               f"answer p50 {s['answer_p50_s']} s, p95 {p95} s (full time points up to 30 s); "
               f"{s['tokens_per_s']} tok/s served")
    gpu_mib = (s.get("miner_metrics") or {}).get("gpu_used_mib")
    if gpu_mib is not None:
        summary += f"; GPU memory in use at the end {gpu_mib:,} MiB (the miner's /metrics)"
    return s["requests"] > 0 and s["valid"] == s["requests"], time.monotonic() - started, summary


def bench_summary(rows: list[dict]) -> str:
    """One line of what bench.py measured: the miner against raw llama.cpp, batching, the KV layouts, a burst."""
    parts = []
    raw = {r["task"]: r for r in rows if r["section"] == "task" and r["path"].startswith("raw")}
    mine = {r["task"]: r for r in rows if r["section"] == "task" and r["path"].startswith("miner")}
    if mine:
        parts.append("one at a time: " + ", ".join(
            f"{t} {r['tok_per_s']:.0f} tok/s" + (f" ({r['tok_per_s'] / raw[t]['tok_per_s']:.2f}x raw)" if t in raw else "")
            for t, r in mine.items()))
    batching = [r for r in rows if r["section"] == "batching"]
    if batching:
        parts.append("batching: " + ", ".join(
            f"{r['path'].split(',')[0]} x{r['at_once']} {r['tok_per_s']:.0f} tok/s ({r['vs_one_at_a_time']:.2f}x)"
            for r in batching))
    steps = [r for r in rows if r["section"] == "steps"]
    if steps:
        names = [k for k in steps[0] if k not in ("section", "kv", "flash_attn", "cells")]
        parts.append("ms per llama_decode: " + "; ".join(
            f"{r['kv']}: " + ", ".join(f"{n} {r[n]:.1f}" for n in names) for r in steps))
    bursts = [r for r in rows if r["section"] == "burst"]
    if bursts:
        parts.append("burst: " + ", ".join(
            f"sharing {r['sharing']}: {r['valid']} valid, refused {r['refused']}, {r['seconds']:.1f} s"
            + (f", 1st token {r['first_token_mean_s']:.2f} s" if not math.isnan(r["first_token_mean_s"]) else "")
            for r in bursts))
    return "; ".join(parts) or "no rows"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model")
    model.add_argument("--vocab", type=Path, required=True)
    model.add_argument("--shape", default="llama-3.1-8b", help="a shape of models/synthetic.py; tiny to rehearse")
    prove, measure, failed = sub.add_parser("prove"), sub.add_parser("measure"), sub.add_parser("failed")
    for p in (model, prove, measure, failed):
        p.add_argument("--out", type=Path, required=True)
    for p in (model, prove, measure):
        p.add_argument("--work", type=Path, required=True)
    prove.add_argument("--build-seconds", type=float, default=0.0)
    measure.add_argument("--seconds", type=float, default=285, help="the whole call's budget")
    measure.add_argument("--loadtest-seconds", type=float, default=120)
    measure.add_argument("--plans", type=lambda v: [float(x) for x in v.split(",")], default=[VRAM_GB, PARTIAL_VRAM_GB],
                         help="VRAM plans (GiB) the validators' step runs against, in order, while time is left")
    measure.add_argument("--validators", type=int, default=8)
    measure.add_argument("--bench", type=shlex.split, default=BENCH, help="bench.py's arguments (default: the GPU set)")
    measure.add_argument("--burst", type=shlex.split, default=BURST, help="the burst bench's arguments; empty: none")
    measure.add_argument("--loadtest", type=shlex.split, default=[], help="more of loadtest.py's arguments")
    failed.add_argument("--step", required=True)
    failed.add_argument("--log", type=Path, required=True)
    sub.add_parser("serve").add_argument("--model", type=Path, required=True)
    sub.add_parser("restart").add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    return {"model": cmd_model, "prove": cmd_prove, "measure": cmd_measure, "failed": cmd_failed,
            "serve": cmd_serve, "restart": cmd_restart}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
