"""A request's answer as it decodes: how each of its job's tokens is drawn, and how it ends (the job and
the result are backends/engine/work.py's).

A token is drawn from llama.cpp's logits with the sequence's own sampler, and the schema's matcher is asked
about that one token; only a refused draw costs the full-vocabulary mask and a second draw (constraint.py).
The schema's forced text follows the drawn token into the next step's batch.
"""
from __future__ import annotations

import time

from backends.engine.work import Job, Result, Ticket
from backends.llama_lowlevel import Context, Model


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
        job.sampler.follow(forced)
        job.out += forced
        job.pending += forced
        job.forced += len(forced)
        if job.matcher.done:
            return "stop"
    return "length" if len(job.out) >= job.max_tokens else None


def result(job: Job, ticket: Ticket, reason: str) -> Result:
    return Result(job.out, len(job.prompt), job.reused, job.forced, reason, job.started - ticket.arrived, job.note,
                  job.schema, job.first_token - ticket.arrived if job.first_token else None, job.rejected)

