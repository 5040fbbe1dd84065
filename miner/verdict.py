"""Whether a model can answer each task before the validators' timeout on this host: `fit`'s answer-time table
(before a download: the plan's bytes per token at this host's measured RAM read rate) and the start's (the
warm-up's measured speed), and the health row that says so while no backend after it could answer instead.

An answer's time is its prompt's prefill plus its tokens at one answer's decode speed. The tokens are those
of the validators' own 3.2.1 request for each task (their Chinese prompt and mock context) at three sizes:
the full schema, the scoring rules' floors, and the contract's least (backends/sizing.py shrinks an answer
through these to arrive in time). A verdict, not a fault: a model too slow for a task degrades health,
never downs it, since restarting cannot make it faster.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from backends import llama_lowlevel as ll
from backends.base import Backend
from backends.sizing import shrink, worst_case
from miner.config import GenerationSettings
from miner.contract import TASK_TYPES, VALIDATOR_TIMEOUT_S
from miner.examples import VALIDATOR_PROMPTS, validator_fields
from miner.health import Check
from miner.service import prepare
from miner.tasks.common import SAMPLES
from models import fit, host

# Tokens a character costs where no tokenizer is at hand (a catalog name): Llama-3's, measured on the
# project's own samples (backends/sizing.py CharCost); a GGUF file is measured with its own tokenizer.
TOKENS_PER_CHAR = {"Simplified Chinese": 0.8, "English": 0.25}
# What the prompt's batches cost when weights stay in RAM: llama.cpp copies them to the GPU for each batch of
# n_ubatch tokens. PCIe 3.0 x16, an RTX 2060's; a mining riser at x1 carries a sixteenth of it.
PCIE_BYTES_PER_S = 12e9
# Prompt speed where a GPU holds the weights, for an 8B Q4 (4.6 GiB read a token): an assumption for a 6 GB
# card, scaled by the bytes a model reads; docs/measurements.md has 4,955 tok/s on an H100.
GPU_PREFILL = (1000.0, 4.6 * fit.GiB)
# CPU only: prompt tokens go this many times faster than decoded ones (docs/measurements.md, 2 cores).
CPU_PREFILL_RATIO = 3.5
SIZES = (("full", 1.0), ("floors", 1 / 3), ("least", 0.0))  # backends/sizing.py shrink's stages


@dataclass(frozen=True)
class Load:
    """One task's work for the validators' request: prompt tokens and the answer's tokens at each size."""
    task: str
    prompt_tokens: int
    answer_tokens: dict[str, int]


@dataclass(frozen=True)
class Speed:
    prefill_tok_s: float
    decode_tok_s: float  # one answer alone
    source: str


@dataclass(frozen=True)
class Verdict:
    task: str
    seconds: dict[str, float]  # by size
    limit_s: float

    @property
    def size(self) -> str | None:
        """The largest size that arrives in time; None: not even the least."""
        return next((name for name, _ in SIZES if self.seconds[name] <= self.limit_s), None)

    @property
    def words(self) -> str:
        return {"full": "in time", "floors": "in time, shrunk toward the scoring floors",
                "least": "in time only below the scoring floors", None: "too slow"}[self.size]


def tokens_per_char(model: str | Path) -> dict[str, float]:
    """Per language: a GGUF file's own tokenizer on the samples; otherwise the catalog's figures."""
    if not Path(model).is_file():
        return TOKENS_PER_CHAR
    vocab = ll.Model(Path(model), 0, vocab_only=True)
    try:
        return {lang: len(vocab.tokenize(SAMPLES[lang], add_special=False, parse_special=False)) / len(SAMPLES[lang])
                for lang in TOKENS_PER_CHAR}
    finally:
        vocab.close()


def loads(costs: dict[str, float]) -> list[Load]:
    """Each task's load for the validators' request with their first Chinese prompt."""
    settings = GenerationSettings()

    def count(text: str) -> int:  # prompts mix the request's Chinese with English instructions
        chinese = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
        return math.ceil(chinese * costs["Simplified Chinese"] + (len(text) - chinese) * costs["English"])

    out = []
    for task in TASK_TYPES:
        spec, ctx = prepare(validator_fields(task, VALIDATOR_PROMPTS[0]), settings)
        schema = spec.schema(ctx)
        prompt = sum(count(m["content"]) for m in spec.messages(ctx, settings.language, schema))
        sizes = {name: math.ceil(worst_case(shrink(schema, scale), costs["Simplified Chinese"], count).tokens)
                 for name, scale in SIZES}
        out.append(Load(task, prompt, sizes))
    return out


def planned_speed(plan: fit.Plan, ram_read_bytes_per_s: float) -> Speed:
    """One answer's speed as the plan's reads per token predict it on this host; the card is fit's example."""
    ram, vram = fit.reads_per_token(plan.profile, plan.n_gpu_layers, plan.n_cpu_moe)
    card, card_bytes_per_s = fit.EXAMPLE_CARD
    per_token = ram / ram_read_bytes_per_s + vram / card_bytes_per_s
    reads = f"{ram / fit.GiB:.2f} GiB a token from RAM at this host's {ram_read_bytes_per_s / 1e9:.0f} GB/s"
    if plan.n_gpu_layers == 0:
        return Speed(CPU_PREFILL_RATIO / per_token, 1 / per_token, f"planned: {reads}, CPU only")
    rate, rate_bytes = GPU_PREFILL
    copied = fit.ram_resident_bytes(plan.profile, plan.n_gpu_layers, plan.n_cpu_moe)
    per_prompt_token = copied / PCIE_BYTES_PER_S / fit.N_UBATCH + (ram + vram) / rate_bytes / rate
    return Speed(1 / per_prompt_token, 1 / per_token,
                 f"planned: {reads}, {vram / fit.GiB:.2f} GiB from VRAM at {card}'s {card_bytes_per_s / 1e9:.0f} GB/s")


def learned_speed(backend: Backend) -> Speed | None:
    """What the backend's warm-up measured (and its answers since); None before it has."""
    gauges = backend.gauges()
    if gauges is None or not gauges.prefill_tok_s or 1 not in gauges.decode_tok_s:
        return None
    return Speed(gauges.prefill_tok_s, gauges.decode_tok_s[1], "measured at warm-up")


def verdicts(work: list[Load], speed: Speed, limit_s: float) -> list[Verdict]:
    return [Verdict(load.task, {name: load.prompt_tokens / speed.prefill_tok_s + tokens / speed.decode_tok_s
                                for name, tokens in load.answer_tokens.items()}, limit_s) for load in work]


def table(found: list[Verdict], work: list[Load], speed: Speed) -> str:
    rows = [("task", "prompt", "full", "floors", "least", "verdict")]
    for v, load in zip(found, work):
        rows.append((v.task, f"{load.prompt_tokens} tok", *(f"{load.answer_tokens[n]} tok {v.seconds[n]:.0f} s"
                                                            for n, _ in SIZES), v.words))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    head = (f"answer times for the validators' request, one answer alone, limit {found[0].limit_s:.0f} s: prefill "
            f"{speed.prefill_tok_s:,.0f} tok/s, decode {speed.decode_tok_s:.1f} tok/s ({speed.source})")
    return "\n".join([head, *lines])


FIX = "put an API backend after it, or choose a smaller model (`storynet-miner fit`)"


def too_slow(found: list[Verdict], speed: Speed) -> str | None:
    """Which tasks cannot arrive in time even at their least, and why; None when every one can."""
    slow = [v for v in found if v.size is None]
    if not slow:
        return None
    worst = max(slow, key=lambda v: v.seconds["least"])
    return (f"cannot answer {', '.join(v.task for v in slow)} in {worst.limit_s:.0f} s here ({worst.task} at its "
            f"least needs about {worst.seconds['least']:.0f} s at {speed.decode_tok_s:.1f} tok/s, {speed.source})")


def problem(found: list[Verdict], speed: Speed) -> str | None:
    """The operator's line when some task cannot arrive in time even at its least: why, and the fix."""
    why = too_slow(found, speed)
    return f"{why}: {FIX}" if why else None


def limit_s(settings: GenerationSettings) -> float:
    return VALIDATOR_TIMEOUT_S - settings.response_margin_s


def _first_local(backends: list[Backend]) -> tuple[int, Speed] | None:
    local = next((i for i, b in enumerate(backends) if b.mode == "local"), None)
    speed = learned_speed(backends[local]) if local is not None else None
    return (local, speed) if speed is not None else None


def check(backends: list[Backend], settings: GenerationSettings) -> Check | None:
    """The health row for the first local backend: False (degraded) while some task cannot arrive in time
    and no backend after it is there to answer instead; None when there is nothing to judge yet."""
    if (found := _first_local(backends)) is None:
        return None
    local, speed = found
    why = too_slow(verdicts(loads(TOKENS_PER_CHAR), speed, limit_s(settings)), speed)
    if why is None:
        return Check("answer time", True, f"every task arrives within {limit_s(settings):.0f} s at "
                                          f"{speed.decode_tok_s:.1f} tok/s ({speed.source})")
    after = [b.name for b in backends[local + 1:]]
    if after:
        return Check("answer time", True, f"{why}; {after[0]} answers when it cannot")
    return Check("answer time", False, f"{why}: {FIX}", concern="answers miss the validators' timeout")


def start_report(backends: list[Backend], settings: GenerationSettings) -> tuple[str, bool] | None:
    """The answer-time table at start, from the warm-up's speed, and whether some task cannot arrive in time."""
    if (found := _first_local(backends)) is None:
        return None
    _, speed = found
    work = loads(TOKENS_PER_CHAR)
    times = verdicts(work, speed, limit_s(settings))
    line = problem(times, speed)
    return "\n".join(filter(None, [table(times, work, speed), line])), line is not None


# ---- the `fit` command: the plan, then its answer times on this host ---------------------------------

def arguments(ap: argparse.ArgumentParser) -> None:
    fit.arguments(ap)


def command(args: argparse.Namespace) -> int:
    """fit's plan table, then this host's RAM, its measured read rate and the answer-time table."""
    plan = fit.plan_for(args)
    total, available = host.ram_bytes()
    read = host.read_bandwidth()
    work = loads(tokens_per_char(args.model))
    speed = planned_speed(plan, read)
    found = verdicts(work, speed, limit_s(GenerationSettings()))
    ram_needed = fit.ram_resident_bytes(plan.profile, plan.n_gpu_layers, plan.n_cpu_moe) + plan.profile.layout.input_bytes
    memory = (f"this host: {total / fit.GiB:.1f} GiB RAM ({available / fit.GiB:.1f} GiB available), reads "
              f"{read / 1e9:.1f} GB/s with {host.default_threads()} threads; the plan keeps "
              f"{ram_needed / fit.GiB:.1f} GiB of weights in RAM")
    short = (f"not enough RAM: {ram_needed / fit.GiB:.1f} GiB of weights would be read from disk for every token, "
             "far slower than the times above; choose a smaller model or quant, or a host with more RAM"
             if ram_needed > available else None)
    warning = "\n".join(filter(None, [problem(found, speed), short])) or None
    if args.json:
        print(json.dumps({**plan.to_json(), "host": {"ram_bytes": total, "ram_available_bytes": available,
                                                   "read_bytes_per_s": round(read), "ram_weights_bytes": ram_needed},
                          "speed": dataclasses.asdict(speed),
                          "answers": [{**dataclasses.asdict(v), "size": v.size} for v in found],
                          "verdict": warning}, indent=2))
    else:
        print("\n\n".join(filter(None, [plan.table(), memory, table(found, work, speed), warning])))
    return 0
