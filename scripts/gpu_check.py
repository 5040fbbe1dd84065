"""The GPU proof's steps; scripts/gpu_check.sh runs them on the device machine, in order:

    f16     write an F16 file of Llama-3.1-8B's shapes (runs while llama.cpp builds)
    rest    quantize it to Q4_K_M, `miner fit --vram-gb 6`, load it with that plan (VRAM against the
            plan), one answer per task, then scripts/bench.py under vram_gb 6
    failed  record a step that failed in the shell (the build), with the end of its log

Results: $OUT/gpu_check.json (every step so far) and $OUT/gpu_check.md (a table), rewritten as each step
finishes, so a timeout keeps what finished. Each model load runs in a process of its own, so nvidia-smi
sees what that load added and the next one starts from a free card. Without nvidia-smi the steps still
run (no VRAM figures): `f16 --shape tiny` then `rest` rehearses them on a CPU (tests/test_gpu_tools.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VRAM_GB = 6.0
BENCH = ["--tasks", "blueprint,characters", "--repeat", "2", "--batch-task", "characters", "--batch-requests",
         "8", "--n-ctx", "8192",  # 4 sequences x 2048 cells: what the 6 GiB plan gives Llama-3.1-8B
         "--step-cells", "1000"]  # the step rows' contexts: a validator's prompt and part of an answer


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


def run_json(argv: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {out.returncode}: {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def cmd_f16(args) -> int:
    from models.synthetic import SHAPES, write_f16
    report = Report(args.out)
    started = time.monotonic()
    size = write_f16(args.work / "model.f16.gguf", SHAPES[args.shape], args.vocab,
                     f"{args.shape} synthetic (random weights)")
    report.add("write F16", True, time.monotonic() - started, f"{args.shape} shapes, {size / 1e9:.2f} GB",
               **gpu_facts(), bytes=size)
    return 0


def cmd_failed(args) -> int:
    tail = args.log.read_text(errors="replace")[-3000:] if args.log.exists() else ""
    Report(args.out).add(args.step, False, 0.0, f"failed; see {args.log.name}", log_tail=tail)
    return 1


def cmd_rest(args) -> int:
    import llama_cpp  # built a moment ago, with CUDA

    from models.quantize import quantize
    report = Report(args.out)
    report.add("build", llama_cpp.llama_supports_gpu_offload(), args.build_seconds,
               f"llama-cpp-python {llama_cpp.__version__}, GPU offload "
               f"{'on' if llama_cpp.llama_supports_gpu_offload() else 'OFF'}")
    model = args.work / "model-Q4_K_M.gguf"
    started = time.monotonic()
    quantize(args.work / "model.f16.gguf", model, "Q4_K_M")
    (args.work / "model.f16.gguf").unlink()
    report.add("quantize", True, time.monotonic() - started, f"Q4_K_M, {model.stat().st_size:,} bytes",
               bytes=model.stat().st_size)
    steps = [("fit", ["-m", "miner", "fit", "--model", str(model), "--vram-gb", str(VRAM_GB), "--json"], 120),
             ("load and answer", [__file__, "serve", "--model", str(model)], 240),
             ("bench", ["scripts/bench.py", "--model", str(model), "--vram-gb", str(VRAM_GB), "--json", *BENCH], 300)]
    plan = None
    for step, argv, timeout in steps:
        started = time.monotonic()
        try:
            data = run_json(argv, timeout)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            report.add(step, False, time.monotonic() - started, str(e)[:300])
            continue
        seconds = time.monotonic() - started
        if step == "fit":
            plan = data
            report.add(step, True, seconds, f"{data['n_gpu_layers']} layers, n_ctx {data['n_ctx']}, "
                       f"{data['kv_cache_type']} KV, estimate {data['estimated_vram_bytes'] / 2**20:,.0f} MiB",
                       plan=data)
        elif step == "load and answer":
            ok, summary = judge_load(data, plan)
            report.add(step, ok, seconds, summary, **data)
        else:
            report.add(step, True, seconds, bench_summary(data), bench=data)
    return 0


def judge_load(data: dict, plan: dict | None) -> tuple[bool, str]:
    """Every answer valid, and the VRAM the load added within 5% of the plan and under the budget."""
    valid = sum(a["valid"] for a in data["answers"])
    answers = (f"{valid}/{len(data['answers'])} answers valid: "
               + ", ".join(f"{a['task']} {a['seconds']:.1f} s" for a in data["answers"]))
    measured, budget = data["vram_added_mib"], VRAM_GB * 1024
    estimate = plan["estimated_vram_bytes"] / 2**20 if plan and plan["estimated_vram_bytes"] else None
    if measured is None or estimate is None:
        return valid == len(data["answers"]), f"no VRAM figures (no GPU offload); {answers}"
    off = (measured - estimate) / estimate
    ok = measured <= budget and abs(off) <= 0.05 and valid == len(data["answers"])
    return ok, (f"VRAM added {measured:,} MiB vs plan {estimate:,.0f} MiB ({off:+.1%}), budget {budget:,.0f} MiB; "
                f"{answers}")


def bench_summary(data: dict) -> str:
    tasks = ", ".join(f"{r['task']} {r['path'].split(' ')[0]} {r['tok_per_s']:.0f} tok/s ({r['vs_raw_free']:.2f}x)"
                      for r in data["tasks"])
    batching = ", ".join(f"{r['path'].split(',')[0]} x{r['at_once']} {r['tok_per_s']:.0f} tok/s"
                         for r in data["batching"] if r["at_once"] > 1)
    # The KV layout question (a stream per sequence or one unified cache) is settled by these rows.
    steps = "; ".join(f"{r['kv']}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in r.items()
                                                 if name not in ("kv", "flash_attn"))
                      for r in data.get("steps", []))
    return f"{tasks}; batching {batching}; ms per llama_decode: {steps}"


def cmd_serve(args) -> int:
    """In its own process: load with the 6 GiB plan, measure what that added, answer each task once."""
    before = vram_used_mib()
    import llama_cpp  # noqa: F401  (before numpy: the other order made CUDA loading segfault)

    from backends.chain import BackendState, Chain
    from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
    from miner import examples
    from miner.config import GenerationSettings
    from miner.service import StoryService
    from miner.tasks import TASKS
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="gpu", model_path=str(args.model),
                                                             vram_gb=VRAM_GB))
    added = vram_used_mib() - before if before is not None else None
    service = StoryService(Chain([BackendState(backend, "gpu")]), GenerationSettings())
    answers = []
    for task in TASKS:
        answer = service.answer(examples.validator_fields(task, examples.VALIDATOR_PROMPTS[0]))
        generation = answer.generation
        answers.append({"task": task, "valid": answer.ok, "seconds": round(answer.seconds, 2),
                        "tokens": generation.completion_tokens if generation else 0,
                        "error": answer.output.get("error")})
    json.dump({"vram_added_mib": added, "plan": backend.info().parameters, "parallel": backend.parallel,
               "measured": backend.engine.speed.snapshot(), "answers": answers}, sys.stdout)
    backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f16 = sub.add_parser("f16")
    f16.add_argument("--vocab", type=Path, required=True)
    f16.add_argument("--shape", default="llama-3.1-8b", help="a shape of models/synthetic.py; tiny to rehearse")
    for p in (f16, sub.add_parser("rest"), sub.add_parser("failed")):
        p.add_argument("--out", type=Path, required=True)
    for p in (f16, sub.choices["rest"]):
        p.add_argument("--work", type=Path, required=True)
    sub.choices["rest"].add_argument("--build-seconds", type=float, default=0.0)
    sub.choices["failed"].add_argument("--step", required=True)
    sub.choices["failed"].add_argument("--log", type=Path, required=True)
    sub.add_parser("serve").add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    return {"f16": cmd_f16, "rest": cmd_rest, "failed": cmd_failed, "serve": cmd_serve}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
