"""A request's answer as it decodes: the job, how each of its tokens is drawn, and how it ends.

A token is drawn from llama.cpp's logits with the sequence's own sampler, and the schema's matcher is asked
about that one token; only a refused draw costs the full-vocabulary mask and a second draw (constraint.py).
The schema's forced text follows the drawn token into the next step's batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.constraint import Matcher
from backends.llama_lowlevel import Context, Model, SamplerChain
from backends.sizing import Cost

if TYPE_CHECKING:
    from backends.engine.admission import Ticket


@dataclass
class Job:
    """A request ready to decode: what its backend's `prepare` makes of a ticket at admission."""
    prompt: list[int]  # the full prompt, a fixed start of the answer included
    sampler: SamplerChain
    matcher: Matcher | None
    max_tokens: int
    schema: dict[str, Any] | None = None  # what the matcher holds the answer to
    cost: Cost | None = None  # the planned worst case; None: unbounded (only max_tokens and the clock end it)
    shape: tuple[str, ...] = ()  # the schema's top-level keys: answers alike in how much of it they fill
    note: str = ""  # how it was planned, for the log
    # filled by the engine
    done_prompt: int = 0  # prompt tokens in the KV cache
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next step
    out: list[int] = field(default_factory=list)
    forced: int = 0
    reused: int = 0
    rejected: int = 0  # draws the grammar refused: each cost a full mask and a second draw
    started: float = 0.0
    first_token: float = 0.0  # when the first answer token was drawn

    def left(self, share: float = 1.0, floor: float = 0.0) -> Cost:
        """What is left to write if the answer writes `share` of its worst case (at least `floor` of it
        still to come): sampled and forced tokens."""
        if self.cost is None:
            return Cost(max(self.max_tokens - len(self.out), 0), 0)
        sampled = len(self.out) - self.forced
        return Cost(max(self.cost.sampled * share - sampled, self.cost.sampled * floor),
                    max(self.cost.forced * share - self.forced, 0))


@dataclass
class Result:
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose KV cells came from an earlier request
    forced: int
    finish_reason: str  # "stop" or "length"
    queued_s: float
    note: str
    schema: dict[str, Any] | None
    first_token_s: float | None  # from arrival; None when the answer ended before its first token
    rejected: int = 0


def draw(job: Job, ctx: Context, row: int, model: Model) -> str | None:
    """The job's next token from batch row `row`, with the schema's forced text after it; "stop" or
    "length" when that ends the answer."""
    logits = ctx.logits(row)
    job.sampler.penalize(logits)
    token = job.sampler.draw(ctx, row)
    if job.matcher is not None and not job.matcher.allows(token):
        job.matcher.restrict(logits)
        token = job.sampler.draw(ctx, row)
        job.rejected += 1
    job.sampler.accept(token)
    if model.is_eog(token):
        return "stop"
    if not job.out:
        job.first_token = time.monotonic()
    job.out.append(token)
    job.pending = [token]
    if job.matcher is not None:
        job.matcher.consume([token])
        forced = job.matcher.forced()
        job.out += forced
        job.pending += forced
        job.forced += len(forced)
        if job.matcher.done:
            return "stop"
    return "length" if len(job.out) >= job.max_tokens else None


def result(job: Job, ticket: Ticket, reason: str) -> Result:
    return Result(job.out, len(job.prompt), job.reused, job.forced, reason, job.started - ticket.arrived, job.note,
                  job.schema, job.first_token - ticket.arrived if job.first_token else None, job.rejected)

