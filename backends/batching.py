"""Continuous batching over one llama.cpp context: requests decode together, one llama_decode a step.

As in llama.cpp's server: each request holds a slot, a sequence with its own part of the KV cache; requests
join and leave between steps; prompts are prefilled in chunks beside the slots already decoding; a prompt
reuses the cells of the earlier one on its slot it shares a prefix with, and copies those of another slot
when that one holds more of it (a burst of identical requests evaluates its prompt once). Requests beyond
`parallel` wait, the caller with more stake first, then by arrival, and join only while every answer already
decoding still makes its hard limit. A failed decode is retried in halves, so it costs only the requests
that cannot be decoded. llama-cpp-python's Llama class can do none of this (facts.md), hence this. All
llama.cpp work happens on the engine's one thread; others submit and wait.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.base import BackendBusy, BackendError
from backends.constraint import Masks, Matcher, Vocabulary
from backends.llama_lowlevel import Batch, Context, LlamaError, Model, NoKvRoom, SamplerChain
from backends.sizing import PLAN_MARGIN, Speed

log = logging.getLogger(__name__)

STALL_S = 0.25  # longest a prompt chunk may hold up a step
LOAD_WINDOW_S = 60.0  # the recent load that answers are planned for
MAX_PREFILL_SHARE = 0.5
FILL_UNKNOWN, FILL_MARGIN, FILL_EMA = 0.8, 0.2, 0.3  # how much of its worst case an answer writes
WARM_UP_STEPS = 12
WARM_UP_SHORT = 32  # prompt tokens of the warm-up's extra sequences
MIN_SHARED = 64  # prompt tokens worth copying from another sequence rather than evaluating
MAX_BROKEN_STEPS = 3  # steps in a row that decoded nothing: the context is broken, the backend rebuilds it


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
    prompt_tokens: int = field(compare=False, default=0)  # as asked: what its prefill will cost the others
    cancelled: threading.Event = field(compare=False, default_factory=threading.Event)  # its caller has gone
    future: Future = field(compare=False, default_factory=Future)
    arrived: float = field(compare=False, default_factory=time.monotonic)


@dataclass
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds
    job: Job | None = None
    ticket: Ticket | None = None
    last_used: float = 0.0


@dataclass
class Entry:
    """One sequence's tokens in a step's batch: answer tokens (one sampled, maybe forced text after it) or
    a prompt chunk. `samples`: its last token's logits are sampled this step."""
    slot: Slot
    tokens: list[int]
    prompt: bool
    samples: bool


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
        # A unified cache is one pool: each request keeps to its share of it, so the pool never runs out.
        self.kv_room = ctx.n_ctx // parallel if ctx.kv_unified else ctx.n_ctx_seq
        self.speed: Speed | None = None  # measured by start()
        self.slots = [Slot(seq) for seq in range(parallel)]
        self.batch = Batch(ctx.n_batch)
        self.masks = Masks(vocab, parallel)
        self._masking = ThreadPoolExecutor(1, thread_name_prefix="llama-masks")  # masks fill while llama.cpp decodes
        self._waiting: list[Ticket] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._load_avg, self._load_at = 0.0, time.monotonic()
        self._prefill_s, self._prefill_at = 0.0, time.monotonic()
        self._fill: dict[tuple[str, ...], float] = {}
        self._broken_steps = 0
        self._copied = False  # a sequence's cells were copied since the last decode
        self.stopped_because: str | None = None  # why the engine stopped, when it did
        self.stats = {"steps": 0, "step_s": 0.0, "decode_s": 0.0, "failed_decodes": 0,  # bench.py reads them
                      "prepares": 0, "prepare_s": 0.0}
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
               priority: float, prompt_tokens: int = 0, cancelled: threading.Event | None = None) -> Ticket:
        """Queue a request; refuse it at once (BackendBusy) when it cannot be answered before `hard`.
        floor_s: its smallest answer's time decoding alone, and beside `parallel` others."""
        with self._cond:
            if self._stop:
                raise BackendError(f"the llama.cpp engine has stopped: {self.stopped_because or 'shutting down'}")
            ticket = Ticket((-priority, next(self._arrivals)), hard, prepare, *floor_s, prompt_tokens=prompt_tokens,
                            cancelled=cancelled or threading.Event())
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
                    self._serve_step()
        except Exception as e:  # a broken context: every caller hears of it, nobody hangs
            log.exception("the llama.cpp engine stopped")
            self.stopped_because = f"{type(e).__name__}: {e}"
            self._fail_all(BackendError(f"the llama.cpp engine stopped: {self.stopped_because}"))
        finally:
            self._fail_all(BackendError("the llama.cpp engine is shutting down"))

    def _serve_step(self) -> None:
        """One step; a step that raises costs the answers in flight, not the engine, unless steps keep
        failing: then the context is broken and _run stops (the backend rebuilds it)."""
        try:
            self._step()
        except Exception as e:
            self._broken_steps += 1
            if self._broken_steps >= MAX_BROKEN_STEPS:
                raise
            log.exception("a llama.cpp step failed; the answers in it fail, the engine serves on")
            error = BackendError(f"the answer failed: {type(e).__name__}: {e}")
            for slot in self.slots:
                if slot.ticket is not None:
                    self._release(slot).set_exception(error)
            self.ctx.clear()  # what the cells hold is unknown now
            for slot in self.slots:
                slot.cached = []

    def _track_load(self, now: float) -> None:
        """A running average of decoding sequences over the last minute or so."""
        weight = 1.0 - math.exp(-(now - self._load_at) / LOAD_WINDOW_S)
        self._load_avg += weight * (self.active() - self._load_avg)
        self._load_at = now

    def _admit(self) -> None:
        self._drop_cancelled()
        while self._waiting:
            free = [s for s in self.slots if s.ticket is None]
            if not free:
                return
            ticket = self._waiting[0]
            now = time.monotonic()
            running = self.active()
            if running and (held := self._broken_promise(now, running + 1, ticket.prompt_tokens)):
                log.debug("a request waits: beside it, seq %d would miss its hard limit", held.seq)
                return  # it waits while it can still finish (_enforce_limits lets it go when not)
            heapq.heappop(self._waiting)
            self._track_load(now)
            # Planned for the recent average load too: requests come in waves, and a wave's first one
            # would otherwise be sized as if it were to decode alone. Never refused for a load not there.
            load = Load(now=now, sequences=min(self.parallel, max(running + 1, math.ceil(self._load_avg))),
                        kv_room=self.kv_room, prefill_share=self.prefill_share())
            started = time.perf_counter()
            try:
                try:
                    job = ticket.prepare(load)
                except BackendBusy:
                    if load.sequences <= running + 1:
                        raise
                    job = ticket.prepare(Load(now, running + 1, load.kv_room, load.prefill_share))
            except Exception as e:
                ticket.future.set_exception(e if isinstance(e, BackendError) else
                                            BackendError(f"could not prepare the request: {type(e).__name__}: {e}"))
                continue
            finally:
                self.stats["prepares"] += 1
                self.stats["prepare_s"] += time.perf_counter() - started
            self._place(ticket, job, free)

    def _broken_promise(self, now: float, sequences: int, prompt_tokens: int) -> Slot | None:
        """The running answer that would miss its hard limit if `sequences` decoded from now on and a
        newcomer's prompt took its turn: each is held to its planned worst case, as it was admitted."""
        share = self.prefill_share()
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            left = max((job.max_tokens if math.isinf(job.worst) else job.worst) - len(job.out), 0)
            cells = sequences * (len(slot.cached) + left / 2)
            prompts = len(job.prompt) - job.done_prompt + prompt_tokens
            seconds = (left * self.speed.step_s(sequences, cells) + prompts / self.speed.prefill_tps) * PLAN_MARGIN
            if now + seconds / (1 - share) > slot.ticket.hard:
                return slot
        return None

    def _drop_cancelled(self) -> None:
        gone = [t for t in self._waiting if t.cancelled.is_set()]
        if gone:
            self._waiting = [t for t in self._waiting if not t.cancelled.is_set()]
            heapq.heapify(self._waiting)
        for ticket in gone:
            ticket.future.set_exception(BackendError("cancelled: the caller has gone away"))

    def _place(self, ticket: Ticket, job: Job, free: list[Slot]) -> None:
        """Put the job on a free slot and keep what of its prompt that slot's cache holds. With a stream per
        sequence, the lowest free one: llama.cpp evaluates consecutive sequence ids in one pass, a gap costs
        a second (the prompt start is copied from wherever it is, in _borrow). In a unified cache, the slot
        whose cache shares most of the prompt, else the least recently used."""
        if self.ctx.kv_unified:
            slot = max(free, key=lambda s: (_shared(s.cached, job.prompt), -s.last_used))
        else:
            slot = min(free, key=lambda s: s.seq)
        slot.job, slot.ticket = job, ticket  # first: if the context fails below, the step's handler answers it
        # The last prompt token is always evaluated: its logits start the answer.
        keep = min(_shared(slot.cached, job.prompt), len(job.prompt) - 1)
        slot.cached = []
        self.ctx.forget(slot.seq, keep)
        slot.cached = job.prompt[:keep]
        job.done_prompt, job.reused, job.started = keep, keep, time.monotonic()
        log.debug("seq %d: %d prompt tokens (%d reused), max %d tokens; %s",
                  slot.seq, len(job.prompt), keep, job.max_tokens, job.note)

    def _compact(self) -> None:
        """With a stream per sequence, keep the busy sequence ids consecutive: when a lower one is free and
        nobody waits to take it, the highest busy sequence moves there (its stream is copied; the old one
        stays as a cached prefix). A gap made every step two passes over the weights (facts.md)."""
        if self.ctx.kv_unified or self._waiting:
            return
        free = [s for s in self.slots if s.ticket is None]
        busy = [s for s in self.slots if s.ticket is not None]
        if not free or not busy:
            return
        low, high = min(free, key=lambda s: s.seq), max(busy, key=lambda s: s.seq)
        if low.seq > high.seq:
            return
        low.cached = []
        self.ctx.share(high.seq, low.seq, len(high.cached))
        self._copied = True
        low.cached, low.job, low.ticket = list(high.cached), high.job, high.ticket
        high.job = high.ticket = None
        high.last_used = time.monotonic()
        log.debug("seq %d moved to seq %d", high.seq, low.seq)

    # --- a step: build the batch, decode, observe, sample ---------------------------------------------
    def _step(self) -> None:
        started = time.perf_counter()
        self._compact()
        entries = self._build()
        if entries:
            masks = self._start_masks(entries)
            self.stats["decode_s"] += self._decode(entries, functools.cache(lambda: self._masks_ready(entries, masks)))
        self._enforce_limits()
        self.stats["steps"] += 1
        self.stats["step_s"] += time.perf_counter() - started

    def _build(self) -> list[Entry]:
        """Every decoding sequence's pending tokens, then prompt chunks in the order requests arrived."""
        entries: list[Entry] = []
        room = self.batch.capacity
        for slot in self.slots:
            job = slot.job
            if job is None or job.done_prompt < len(job.prompt) or not job.pending or room <= 0:
                continue
            # Forced text longer than the batch goes in parts; the sequence samples after its last part.
            part = job.pending[:room]
            entries.append(Entry(slot, part, False, len(part) == len(job.pending)))
            room -= len(part)
        # Prompt chunks are kept short enough that neither the decoding slots nor a newly arrived request
        # (admitted, or refused, between steps) wait long for a step to end.
        budget = min(room, max(32, int(self.speed.prefill_tps * STALL_S)))
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
            entries.append(Entry(slot, chunk, True, job.done_prompt + len(chunk) == len(job.prompt)))
            budget -= len(chunk)
        return entries

    def _start_masks(self, entries: list[Entry]) -> Future | None:
        """The constrained sequences' masks for this step's sampling, computed while llama.cpp decodes: each
        matcher already holds every token sampled so far."""
        matchers = [e.slot.job.matcher for e in entries if e.samples and e.slot.job.matcher is not None]
        return self._masking.submit(self.masks.fill, matchers) if matchers else None

    def _masks_ready(self, entries: list[Entry], masks: Future | None) -> dict[int, int]:
        """seq -> its row of the masks; a constraint's failure costs its requests, not the engine."""
        constrained = [e.slot for e in entries if e.samples and e.slot.job.matcher is not None]
        if masks is None:
            return {}
        try:
            masks.result()
        except Exception as e:
            for slot in constrained:
                self._fail(slot, e)
            return {}
        return {slot.seq: k for k, slot in enumerate(constrained)}

    def _batch_of(self, entries: list[Entry]) -> dict[int, int]:
        """The batch of these entries; seq -> the row its sampling reads."""
        self.batch.clear()
        rows = {}
        for e in entries:
            row = self.batch.add(e.tokens, e.slot.seq, len(e.slot.cached), logits_last=e.samples)
            if e.samples:
                rows[e.slot.seq] = row
        return rows

    def _decode(self, entries: list[Entry], mask_rows: Callable[[], dict[int, int]], whole: bool = True) -> float:
        """Decode, then account and sample; a failure goes to _recover. mask_rows: seq -> its row of the
        masks, asked for only once llama.cpp is done (they fill meanwhile). whole: the step's full batch,
        whose time the planner learns from."""
        entries = [e for e in entries if e.slot.job is not None]  # a retry's part may have lost some
        if not entries:
            return 0.0
        rows = self._batch_of(entries)
        started = time.perf_counter()
        try:
            self.ctx.decode(self.batch)
        except LlamaError as e:
            seconds = time.perf_counter() - started
            self._restore(entries)
            self._recover(entries, mask_rows, e)
            return seconds
        seconds = time.perf_counter() - started
        self._broken_steps = 0
        self._account(entries)
        if whole:
            self._observe(entries, seconds)
        self._sample(entries, rows, mask_rows())
        return seconds

    def _recover(self, entries: list[Entry], mask_rows: Callable[[], dict[int, int]], error: LlamaError) -> None:
        """As llama.cpp's server does: a batch that failed is decoded again in halves, down to one sequence;
        a sequence that fails alone fails its own request only. With no room in a unified cache, the
        cached prompts of free slots are dropped first."""
        mask_rows()  # the masks were filling: wait for them before the batch is refilled
        self.stats["failed_decodes"] += 1
        log.warning("llama_decode failed for %d sequences (%s); retrying in smaller batches", len(entries), error)
        if isinstance(error, NoKvRoom) and self.ctx.kv_unified:
            idle = [s for s in self.slots if s.ticket is None and s.cached]
            for slot in idle:
                slot.cached = []
                self.ctx.forget(slot.seq)
            if idle:
                self._decode(entries, mask_rows, whole=False)
                return
        if len(entries) == 1:
            self._broken_steps += 1
            if self._broken_steps >= MAX_BROKEN_STEPS:
                raise error
            kind = BackendBusy if isinstance(error, NoKvRoom) else BackendError
            self._release(entries[0].slot).set_exception(kind(f"{'busy: ' if kind is BackendBusy else ''}"
                                                              f"llama.cpp could not decode this answer: {error}"))
            return
        half = len(entries) // 2
        for part in (entries[:half], entries[half:]):
            self._decode(part, mask_rows, whole=False)

    def _restore(self, entries: list[Entry]) -> None:
        """Drop whatever a failed decode left in the cache past what each sequence is known to hold."""
        for e in entries:
            self.ctx.forget(e.slot.seq, len(e.slot.cached))

    def _account(self, entries: list[Entry]) -> None:
        """The batch is in the cache now: record which tokens each sequence holds."""
        for e in entries:
            job = e.slot.job
            e.slot.cached += e.tokens
            if e.prompt:
                job.done_prompt += len(e.tokens)
            else:
                job.pending = job.pending[len(e.tokens):]

    def _observe(self, entries: list[Entry], seconds: float) -> None:
        """What the step teaches the planner: prompt speed from steps that are mostly prompt, step time
        from steps of one token a sequence only. Forced text in a small batch costs more a token than a
        prompt does (5.7 ms against 3 on 2 cores), so subtracting it at prompt speed made steps read slow."""
        prompt_tokens = sum(len(e.tokens) for e in entries if e.prompt)
        decoding = [e for e in entries if not e.prompt]
        extra = sum(len(e.tokens) - 1 for e in decoding)  # forced text beside the one sampled token each
        if prompt_tokens:
            self._track_prefill(prompt_tokens / self.speed.prefill_tps)
        copied, self._copied = self._copied, False
        if copied:  # llama.cpp copied a whole KV stream inside this decode: not a step's time
            return
        if prompt_tokens >= 16:
            self.speed.observe_prefill(prompt_tokens + extra + len(decoding), seconds)
        elif decoding and not prompt_tokens and not extra:
            self.speed.observe_step(len(decoding), seconds, sum(len(e.slot.cached) for e in decoding))

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
        self._copied = True
        slot.cached = job.prompt[:keep]
        job.reused += keep - job.done_prompt
        job.done_prompt = keep
        log.debug("seq %d: %d prompt tokens copied from seq %d", slot.seq, keep, best.seq)

    def _sample(self, entries: list[Entry], rows: dict[int, int], mask_rows: dict[int, int]) -> None:
        for e in entries:
            slot = e.slot
            if not e.samples or slot.job is None:
                continue
            if slot.job.matcher is not None and slot.seq not in mask_rows:
                continue  # its constraint failed: _masks_ready answered it
            try:
                self._sample_one(slot, rows[slot.seq], mask_rows.get(slot.seq, -1))
            except Exception as error:
                self._fail(slot, error)

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
        """Answers past their hard limit, or whose caller has gone, leave their slots now."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.ticket is None:
                continue
            job = slot.job
            if slot.ticket.cancelled.is_set():
                self._release(slot).set_exception(BackendError(
                    f"cancelled after {len(job.out)} tokens: the caller has gone away"))
            elif now >= slot.ticket.hard:  # overload, not a fault: the chain moves on with no cool-down
                self._release(slot).set_exception(BackendBusy(
                    f"busy: the hard limit passed after {len(job.out)} tokens (planned: {job.note})"))
        with self._cond:  # estimates were wrong: a ticket that can no longer finish is let go now
            self._drop_cancelled()
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
        """Measure prompt speed, and decode speed at 1, 2 and `parallel` consecutive sequences (the shapes
        steps have), before serving. The first decode is not timed: it pays for lazy set-up (CUDA's, or
        reading a mapped file), and would make prompts look slow and the first requests dear."""
        self.ctx.clear()
        prompt = prompt[:self.batch.capacity]
        self.batch.clear()
        self.batch.add(prompt[:WARM_UP_SHORT], 0, 0, logits_last=True)
        self.ctx.decode(self.batch)
        self.ctx.clear()
        starts = [prompt] + [prompt[:WARM_UP_SHORT]] * (self.parallel - 1)  # the others only need to exist
        for seq, tokens in enumerate(starts):
            self.batch.clear()
            self.batch.add(tokens, seq, 0, logits_last=True)
            started = time.perf_counter()
            self.ctx.decode(self.batch)
            if seq == 0:
                prefill_tps = len(tokens) / (time.perf_counter() - started)
        step_s, cells = {}, {}
        for n in sorted({1, min(2, self.parallel), self.parallel}):
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
        self._masking.shutdown()
        self.batch.close()
