"""Continuous batching over one llama.cpp context: requests decode together, one llama_decode a step.

As in llama.cpp's server: each request holds a slot, a sequence with its own part of the KV cache; requests
join and leave between steps; prompts are prefilled in chunks beside the slots already decoding; a prompt
reuses the cells of the earlier one on its slot it shares a prefix with, and copies those of another slot
when that one holds more of it (a burst of identical requests evaluates its prompt once). Requests beyond
`parallel` wait, the caller with more stake first, then by arrival. llama-cpp-python's Llama class can do
none of this (facts.md), hence this. All llama.cpp work happens on the engine's one thread; others submit and wait.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.base import BackendBusy, BackendError, DeadlineExceeded
from backends.constraint import Masks, Matcher, Vocabulary
from backends.llama_lowlevel import Batch, Context, Model, SamplerChain
from backends.sizing import Speed

log = logging.getLogger(__name__)

STALL_S = 0.25  # longest a prompt chunk may hold up a step
LOAD_WINDOW_S = 60.0  # the recent load that answers are planned for
MAX_PREFILL_SHARE = 0.5
FILL_UNKNOWN, FILL_MARGIN, FILL_EMA = 0.8, 0.2, 0.3  # how much of its worst case an answer writes
WARM_UP_STEPS = 12
WARM_UP_SHORT = 32  # prompt tokens of the warm-up's extra sequences
MIN_SHARED = 64  # prompt tokens worth copying from another sequence rather than evaluating


@dataclass(frozen=True)
class Load:
    """What a request is planned against when it is admitted."""
    now: float
    sequences: int  # sequences expected to decode beside it, itself included
    kv_room: int  # KV cells of its slot, prompt included
    prefill_share: float = 0.0  # of the time, what other requests' prompts took lately: not decoding


@dataclass
class Job:
    """A request ready to decode: what `prepare` makes of a ticket at admission."""
    prompt: list[int]  # the full prompt, a fixed start of the answer included
    sampler: SamplerChain
    matcher: Matcher | None
    max_tokens: int
    schema: dict[str, Any] | None = None  # what the matcher holds the answer to
    worst: float = math.inf  # the planned worst case in tokens; infinite when unbounded
    shape: tuple[str, ...] = ()  # the schema's top-level keys: answers alike in how much of it they fill
    note: str = ""  # how it was planned, for the log
    # filled by the engine
    done_prompt: int = 0  # prompt tokens in the KV cache
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next step
    out: list[int] = field(default_factory=list)
    forced: int = 0
    reused: int = 0
    started: float = 0.0
    first_token: float = 0.0  # when the first answer token was sampled


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


@dataclass(order=True)
class Ticket:
    order: tuple[float, int]  # (-priority, arrival number): the heap's order
    hard: float = field(compare=False)  # time.monotonic() the answer must be back by
    prepare: Callable[[Load], Job] = field(compare=False)  # raises BackendBusy when it cannot fit
    floor_s: float = field(compare=False)  # its smallest answer's time decoding alone
    floor_full_s: float = field(compare=False)  # ... and beside `parallel` others, as when it had to wait
    future: Future = field(compare=False, default_factory=Future)
    arrived: float = field(compare=False, default_factory=time.monotonic)


@dataclass
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds
    job: Job | None = None
    ticket: Ticket | None = None
    last_used: float = 0.0


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(self, model: Model, ctx: Context, vocab: Vocabulary, parallel: int, share_prefixes: bool = True):
        self.model, self.ctx, self.vocab, self.parallel = model, ctx, vocab, parallel
        self.share_prefixes = share_prefixes  # copy a prompt start another sequence holds (bench.py compares)
        self.speed: Speed | None = None  # measured by start()
        self.slots = [Slot(seq) for seq in range(parallel)]
        self.batch = Batch(ctx.n_batch)
        self.masks = Masks(vocab, parallel)
        self._waiting: list[Ticket] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._load_avg, self._load_at = 0.0, time.monotonic()
        self._prefill_s, self._prefill_at = 0.0, time.monotonic()
        self._fill: dict[tuple[str, ...], float] = {}
        self._thread: threading.Thread | None = None

    def start(self, warm_up_prompt: list[int]) -> None:
        """Measure this machine's speed, then serve. Every decode runs on the engine's own thread:
        llama.cpp's OpenMP workers spin for the thread that last used them, so decoding from a second
        thread made each step 2x slower on 2 cores."""
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(warm_up_prompt, ready), name="llama-engine",
                                        daemon=True)
        self._thread.start()
        ready.result()

    # --- submitting ---------------------------------------------------------------------------------
    def submit(self, hard: float, prepare: Callable[[Load], Job], floor_s: tuple[float, float],
               priority: float) -> Ticket:
        """Queue a request; refuse it at once (BackendBusy) when it cannot be answered before `hard`.
        floor_s: its smallest answer's time decoding alone, and beside `parallel` others."""
        with self._cond:
            if self._stop:
                raise BackendError("the llama.cpp engine is shutting down")
            ticket = Ticket((-priority, next(self._arrivals)), hard, prepare, *floor_s)
            wait = self._expected_wait(ticket)
            if wait > 0 and time.monotonic() + wait + ticket.floor_full_s > hard:  # else admission decides
                raise BackendBusy(f"busy: {self.active()} answers decoding and {len(self._waiting)} waiting; "
                                  f"this one could start in {wait:.0f} s and needs "
                                  f"{ticket.floor_full_s:.0f} s at its smallest, past its limit")
            heapq.heappush(self._waiting, ticket)
            self._cond.notify()
        return ticket

    def _expected_wait(self, ticket: Ticket) -> float:
        """Until a slot frees for this ticket: each busy slot frees when its answer is likely written, and
        each ticket ahead then holds a slot for its smallest answer's time at full load."""
        now = time.monotonic()
        cells = sum(len(s.cached) for s in self.slots if s.job is not None)
        step = self.speed.step_s(self.parallel, cells) / (1 - self.prefill_share())
        frees = [now if slot.ticket is None or slot.job is None else now + self._tokens_left(slot.job) * step
                 for slot in self.slots]
        heapq.heapify(frees)
        for ahead in sorted(t for t in self._waiting if t < ticket):
            heapq.heappush(frees, heapq.heappop(frees) + ahead.floor_full_s)
        return frees[0] - now

    def _tokens_left(self, job: Job) -> float:
        """Answers end well before their worst case (a blueprint writes a tenth of what it may): expect the
        share that recent answers to the same schema used, with a margin."""
        if math.isinf(job.worst):
            return max(job.max_tokens - len(job.out), 0)
        share = min(self._fill.get(job.shape, FILL_UNKNOWN) + FILL_MARGIN, 1.0)
        return max(job.worst * share - len(job.out), job.worst * FILL_MARGIN)

    def active(self) -> int:
        return sum(s.ticket is not None for s in self.slots)

    def prefill_share(self) -> float:
        """Seconds a second spent on prompts over the last minute or so: decoding gets the rest. Requests
        arrive while an answer is written, and their prompts take turns with its steps."""
        with self._cond:
            decayed = self._prefill_s * math.exp(-(time.monotonic() - self._prefill_at) / LOAD_WINDOW_S)
        return min(decayed / LOAD_WINDOW_S, MAX_PREFILL_SHARE)

    def _track_prefill(self, seconds: float) -> None:
        now = time.monotonic()
        with self._cond:
            self._prefill_s = self._prefill_s * math.exp(-(now - self._prefill_at) / LOAD_WINDOW_S) + seconds
            self._prefill_at = now

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def waiting(self) -> int:
        return len(self._waiting)

    # --- the loop -----------------------------------------------------------------------------------
    def _run(self, warm_up_prompt: list[int], ready: Future) -> None:
        try:
            self._warm_up(warm_up_prompt)
        except Exception as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self.active():
                        self._cond.wait()
                    if self._stop:
                        break
                    self._admit()
                if self.active():
                    self._step()
        except Exception as e:  # a broken context: every caller hears of it, nobody hangs
            log.exception("the llama.cpp engine stopped")
            self._fail_all(BackendError(f"the llama.cpp engine stopped: {type(e).__name__}: {e}"))
        finally:
            self._fail_all(BackendError("the llama.cpp engine is shutting down"))

    def _track_load(self, now: float) -> None:
        """A running average of decoding sequences over the last minute or so."""
        weight = 1.0 - math.exp(-(now - self._load_at) / LOAD_WINDOW_S)
        self._load_avg += weight * (self.active() - self._load_avg)
        self._load_at = now

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.ticket is None]
            if not free:
                return
            ticket = heapq.heappop(self._waiting)
            now = time.monotonic()
            self._track_load(now)
            # Planned for the recent average load too: requests come in waves, and a wave's first one
            # would otherwise be sized as if it were to decode alone.
            load = Load(now=now, sequences=min(self.parallel, max(self.active() + 1, math.ceil(self._load_avg))),
                        kv_room=self.ctx.n_ctx_seq, prefill_share=self.prefill_share())
            try:
                job = ticket.prepare(load)
            except Exception as e:
                ticket.future.set_exception(e if isinstance(e, BackendError) else
                                            BackendError(f"could not prepare the request: {type(e).__name__}: {e}"))
                continue
            self._place(ticket, job, free)  # a failure here is the context's: _run fails everyone

    def _place(self, ticket: Ticket, job: Job, free: list[Slot]) -> None:
        """Put the job on the free slot whose cache shares most of its prompt; keep that much of it."""
        slot = max(free, key=lambda s: (_shared(s.cached, job.prompt), -s.last_used))
        slot.job, slot.ticket = job, ticket  # first: if the context fails below, _fail_all answers it
        # The last prompt token is always evaluated: its logits start the answer.
        keep = min(_shared(slot.cached, job.prompt), len(job.prompt) - 1)
        slot.cached = []
        self.ctx.forget(slot.seq, keep)
        slot.cached = job.prompt[:keep]
        job.done_prompt, job.reused, job.started = keep, keep, time.monotonic()
        log.debug("seq %d: %d prompt tokens (%d reused), max %d tokens; %s",
                  slot.seq, len(job.prompt), keep, job.max_tokens, job.note)

    def _step(self) -> None:
        self.batch.clear()
        rows: dict[int, int] = {}  # seq -> batch row whose logits it samples from
        added: dict[int, int] = {}  # seq -> answer tokens it has in this batch
        extra = 0  # tokens beyond one per decoding sequence: forced text and prompt chunks
        for slot in self.slots:
            job = slot.job
            room = self.batch.capacity - self.batch.n
            if job is None or job.done_prompt < len(job.prompt) or not job.pending or room <= 0:
                continue
            # Forced text longer than the batch goes in parts; the sequence samples after its last part.
            part = job.pending[:room]
            row = self.batch.add(part, slot.seq, len(slot.cached), logits_last=len(part) == len(job.pending))
            if len(part) == len(job.pending):
                rows[slot.seq] = row
            added[slot.seq] = len(part)
            extra += len(part) - 1
        decoding = [s for s in self.slots if s.seq in added]
        # Prompt chunks are kept short enough that neither the decoding slots nor a newly arrived request
        # (admitted, or refused, between steps) wait long for a step to end.
        budget = min(self.batch.capacity - self.batch.n, max(32, int(self.speed.prefill_tps * STALL_S)))
        prompt_tokens = 0
        chunks: dict[int, int] = {}  # seq -> prompt tokens it has in this batch
        for slot in sorted((s for s in self.slots if s.job is not None and s.job.done_prompt < len(s.job.prompt)),
                           key=lambda s: s.ticket.order):
            if budget <= 0:
                break
            if self.share_prefixes:
                if self._leader_ahead(slot):
                    continue  # the same prompt start is being evaluated for another request: wait and copy it
                self._borrow(slot)
            job = slot.job
            chunk = job.prompt[job.done_prompt:job.done_prompt + budget]
            last = job.done_prompt + len(chunk) == len(job.prompt)
            row = self.batch.add(chunk, slot.seq, job.done_prompt, logits_last=last)
            if last:
                rows[slot.seq] = row
            chunks[slot.seq] = len(chunk)
            budget -= len(chunk)
            prompt_tokens += len(chunk)
        started = time.perf_counter()
        self.ctx.decode(self.batch)
        seconds = time.perf_counter() - started
        self._account(added, chunks)
        if prompt_tokens:
            self._track_prefill(prompt_tokens / self.speed.prefill_tps)
        if prompt_tokens >= 16:
            self.speed.observe_prefill(prompt_tokens + extra + len(decoding), seconds)
        elif decoding:
            forced_s = extra / self.speed.prefill_tps
            self.speed.observe_step(len(decoding), max(seconds - forced_s, seconds / 2),
                                    sum(len(slot.cached) for slot in decoding))
        self._sample(rows)
        self._enforce_limits()

    def _shareable(self, job: Job, tokens: list[int]) -> int:
        """How much of job's prompt `tokens` starts with, when that is worth a copy; else 0. The last prompt
        token is always evaluated: its logits start the answer."""
        n = min(_shared(tokens, job.prompt), len(job.prompt) - 1)
        return n if n >= job.done_prompt + MIN_SHARED else 0

    def _leader_ahead(self, slot: Slot) -> bool:
        """Whether a request ahead of this one is still evaluating a prompt start they share."""
        job = slot.job
        for other in self.slots:
            lead = other.job
            if (other is not slot and lead is not None and other.ticket.order < slot.ticket.order
                    and lead.done_prompt < self._shareable(job, lead.prompt)):
                return True
        return False

    def _borrow(self, slot: Slot) -> None:
        """Copy the KV cells of the longest start of this prompt that another sequence holds (bursts of
        identical requests: one prefill); sampling stays each request's own."""
        job = slot.job
        best, keep = None, 0
        for other in self.slots:
            n = self._shareable(job, other.cached) if other is not slot else 0
            if n > keep:
                best, keep = other, n
        if best is None:
            return
        slot.cached = []  # first: if the copy fails, this slot holds nothing known
        self.ctx.share(best.seq, slot.seq, keep)
        slot.cached = job.prompt[:keep]
        job.reused += keep - job.done_prompt
        job.done_prompt = keep
        log.debug("seq %d: %d prompt tokens copied from seq %d", slot.seq, keep, best.seq)

    def _account(self, added: dict[int, int], chunks: dict[int, int]) -> None:
        """The batch is in the cache now: record which tokens each sequence holds."""
        for slot in self.slots:
            if slot.seq in added:
                job = slot.job
                slot.cached += job.pending[:added[slot.seq]]
                job.pending = job.pending[added[slot.seq]:]
            if slot.seq in chunks:
                job = slot.job
                slot.cached += job.prompt[job.done_prompt:job.done_prompt + chunks[slot.seq]]
                job.done_prompt += chunks[slot.seq]

    def _sample(self, rows: dict[int, int]) -> None:
        ready = [s for s in self.slots if s.job is not None and s.seq in rows]
        constrained = [s for s in ready if s.job.matcher is not None]
        try:
            if constrained:
                self.masks.fill([s.job.matcher for s in constrained])
        except Exception as e:  # a constraint's failure costs its requests, not the engine
            for slot in constrained:
                self._fail(slot, e)
            ready = [s for s in ready if s not in constrained]
        for slot in ready:
            try:
                self._sample_one(slot, rows[slot.seq], constrained.index(slot) if slot in constrained else -1)
            except Exception as e:
                self._fail(slot, e)

    def _sample_one(self, slot: Slot, row: int, mask: int) -> None:
        job = slot.job
        if mask >= 0:
            self.masks.apply(mask, self.ctx.logits(row))
        token = job.sampler.sample(self.ctx, row)
        if self.model.is_eog(token):
            self._finish(slot, "stop")
            return
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
                self._finish(slot, "stop")
                return
        if len(job.out) >= job.max_tokens:
            self._finish(slot, "length")

    def _fail(self, slot: Slot, error: Exception) -> None:
        log.exception("seq %d: the answer failed", slot.seq, exc_info=error)
        self._release(slot).set_exception(BackendError(f"the answer failed: {type(error).__name__}: {error}"))

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.ticket is not None and now >= slot.ticket.hard:
                job = slot.job
                self._release(slot).set_exception(DeadlineExceeded(
                    f"the hard limit passed after {len(job.out)} tokens (planned: {job.note})"))
        with self._cond:  # estimates were wrong: a ticket that can no longer finish is let go now
            late = [t for t in self._waiting if t.hard - now < t.floor_s]
            if late:
                self._waiting = [t for t in self._waiting if t not in late]
                heapq.heapify(self._waiting)
        for ticket in late:
            ticket.future.set_exception(BackendBusy(
                f"busy: waited {now - ticket.arrived:.0f} s and can no longer finish before its limit"))

    def _finish(self, slot: Slot, reason: str) -> None:
        job, ticket = slot.job, slot.ticket
        if reason == "stop" and not math.isinf(job.worst):
            old = self._fill.get(job.shape, FILL_UNKNOWN)
            self._fill[job.shape] = old + FILL_EMA * (len(job.out) / job.worst - old)
        result = Result(job.out, len(job.prompt), job.reused, job.forced, reason, job.started - ticket.arrived,
                        job.note, job.schema, job.first_token - ticket.arrived if job.first_token else None)
        self._release(slot).set_result(result)

    def _release(self, slot: Slot) -> Future:
        with self._cond:
            future = slot.ticket.future
            slot.job.sampler.close()
            slot.job = slot.ticket = None
            slot.last_used = time.monotonic()
            self._track_load(slot.last_used)
        return future

    def _fail_all(self, error: BackendError) -> None:
        with self._cond:
            self._stop = True  # submit() refuses from now on
            waiting, self._waiting = self._waiting, []
        for ticket in waiting:
            if not ticket.future.done():
                ticket.future.set_exception(error)
        for slot in self.slots:
            if slot.ticket is not None:
                self._release(slot).set_exception(error)

    # --- warm-up and shutdown -----------------------------------------------------------------------
    def _warm_up(self, prompt: list[int]) -> None:
        """Measure prompt speed, and decode speed at 1 and at `parallel` sequences, before serving."""
        self.ctx.clear()
        prompt = prompt[:self.batch.capacity]
        starts = [prompt] + [prompt[:WARM_UP_SHORT]] * (self.parallel - 1)  # the others only need to exist
        for seq, tokens in enumerate(starts):
            self.batch.clear()
            self.batch.add(tokens, seq, 0, logits_last=True)
            started = time.perf_counter()
            self.ctx.decode(self.batch)
            if seq == 0:
                prefill_tps = len(tokens) / (time.perf_counter() - started)
        step_s, cells = {}, {}
        for n in sorted({1, self.parallel}):
            times = []
            for k in range(WARM_UP_STEPS):
                self.batch.clear()
                for seq in range(n):
                    self.batch.add([prompt[k]], seq, len(starts[seq]) + k, logits_last=True)
                started = time.perf_counter()
                self.ctx.decode(self.batch)
                times.append(time.perf_counter() - started)
            step_s[n] = statistics.median(times)
            cells[n] = sum(len(starts[seq]) for seq in range(n)) + n * WARM_UP_STEPS / 2
            for seq in range(n):
                self.ctx.forget(seq, len(starts[seq]))
        self.ctx.clear()
        self.speed = Speed(prefill_tps, step_s, cells)

    def forget_cached(self) -> None:
        """Drop every cached prompt, so the next request starts from an empty cache (bench.py's fair start).
        Only while idle: then the engine thread is waiting and touches no cell."""
        with self._cond:
            if self.active() or self._waiting:
                raise BackendError("forget_cached needs an idle engine")
            for slot in self.slots:
                self.ctx.forget(slot.seq)
                slot.cached = []

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.batch.close()
