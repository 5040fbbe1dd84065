"""Before serving, the engine measures this machine: prompt tokens a second, a step at 1, 2 and `parallel`
consecutive sequences (the shapes steps have), and what forced tokens add to a step. A step is timed as the
engine serves one: llama_decode until its results are ready (llama_lowlevel.Context.decode synchronizes,
so on CUDA these are the GPU's times, not the kernel launches'), then a draw for each sequence."""
from __future__ import annotations

import statistics
import time

from backends.llama_lowlevel import Batch, Context, SamplerChain
from backends.sizing import Speed

STEPS = 8  # a median of 8 steps reads as steady as 12, and an engine the supervisor restarts serves sooner
SHORT = 32  # prompt tokens of the extra sequences: they only need to exist
FORCED = 8  # forced tokens beside a drawn one, to price them


def measure(ctx: Context, batch: Batch, prompt: list[int], parallel: int) -> Speed:
    """The first decode is not timed: it pays for lazy set-up (CUDA's, or reading a mapped file), and would
    make prompts look slow and the first requests dear. The cache is empty again afterwards."""
    ctx.clear()
    prompt = prompt[:batch.capacity]
    _decode(ctx, batch, [(prompt[:SHORT], 0, 0)])
    ctx.clear()
    starts = [prompt] + [prompt[:SHORT]] * (parallel - 1)
    prefill_s = _decode(ctx, batch, [(prompt, 0, 0)])
    for seq in range(1, parallel):
        _decode(ctx, batch, [(starts[seq], seq, 0)])
    samplers = [SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=1.1, seed=seq) for seq in range(parallel)]
    try:
        step_s, cells = {}, {}
        for n in sorted({1, min(2, parallel), parallel}):
            step_s[n] = _steps(ctx, batch, samplers, prompt, starts[:n], 1)
            cells[n] = sum(len(starts[seq]) for seq in range(n)) + n * STEPS / 2
        with_forced = _steps(ctx, batch, samplers, prompt, starts[:1], 1 + FORCED)
        forced_s = max(with_forced - step_s[1], 0.0) / FORCED
    finally:
        for sampler in samplers:
            sampler.close()
    ctx.clear()
    return Speed(len(prompt) / prefill_s, step_s, cells, forced_s)


def _decode(ctx: Context, batch: Batch, parts: list[tuple[list[int], int, int]]) -> float:
    """Decode (tokens, seq, first position) parts in one batch; the seconds it took."""
    batch.clear()
    for tokens, seq, pos in parts:
        batch.add(tokens, seq, pos, logits_last=True)
    started = time.perf_counter()
    ctx.decode(batch)
    return time.perf_counter() - started


def _steps(ctx: Context, batch: Batch, samplers: list[SamplerChain], prompt: list[int], starts: list[list[int]],
           width: int) -> float:
    """The median time of STEPS steps in which each sequence (one per start, ids from 0) adds `width` tokens
    after its start and draws one; the cells they added are dropped again."""
    times, pos = [], [len(start) for start in starts]
    for k in range(STEPS):
        tokens = prompt[k:k + width]
        batch.clear()
        rows = [batch.add(tokens, seq, pos[seq], logits_last=True) for seq in range(len(starts))]
        started = time.perf_counter()
        ctx.decode(batch)
        for seq, row in enumerate(rows):
            samplers[seq].sample(ctx, row)
        times.append(time.perf_counter() - started)
        pos = [p + width for p in pos]
    for seq, start in enumerate(starts):
        ctx.forget(seq, len(start))
    return statistics.median(times)
