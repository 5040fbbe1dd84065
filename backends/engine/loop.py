"""The engine's loop: one thread that admits requests, builds one batch a step (every decoding sequence's
next tokens, then prompt chunks), decodes it, and hands out what each sequence drew.

All llama.cpp work happens on this thread; others submit and wait. A failed decode is retried in halves,
as llama.cpp's server does, so it costs only the requests that cannot be decoded; steps that decode nothing
at all, several in a row, mean the context is broken: the engine stops and says why (the backend rebuilds
it). A step is timed whole, decode and draws, and teaches the time model (sizing.Speed) what a step costs.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from backends.base import BackendBusy, BackendError
from backends.errors import DoesNotFit
from backends.constraint import Vocabulary
from backends.engine import sampling, warm_up
from backends.engine.admission import Admission
from backends.engine.kv import KvCache
from backends.engine.step_clock import StepClock
from backends.engine.work import Job, Load, Slot, Ticket
from backends.llama_lowlevel import Batch, Context, LlamaError, Model, NoKvRoom
from backends.sizing import Speed

log = logging.getLogger(__name__)

STALL_S = 0.25  # longest a prompt chunk may hold up a step
MAX_BROKEN_STEPS = 3  # steps in a row that decoded nothing: the context is broken, the backend rebuilds it


@dataclass
class Entry:
    """One sequence's tokens in a step's batch: answer tokens (one drawn, maybe forced text after it) or a
    prompt chunk. `samples`: its last token's logits are drawn from this step."""
    slot: Slot
    tokens: list[int]
    prompt: bool
    samples: bool


class Engine:
    def __init__(self, model: Model, ctx: Context, vocab: Vocabulary, parallel: int, share_prefixes: bool = True,
                 clock: StepClock | None = None):
        self.model, self.ctx, self.vocab, self.parallel = model, ctx, vocab, parallel
        self.clock = clock if clock is not None else StepClock()  # when the running step began: a stall shows
        self.kv = KvCache(ctx, parallel, share_prefixes)
        self.admission = Admission(parallel, self.kv.room)
        self.speed: Speed | None = None  # measured by start(), before the engine takes any request
        self.batch = Batch(ctx.n_batch)
        self._broken_steps = 0
        # Failed decodes' answers, told at the end of their step: by then the engine knows whether it stopped.
        self._undelivered: list[tuple[Future, BaseException]] = []
        self.stopped_because: str | None = None  # why the engine stopped, when it did
        self.stats = {"steps": 0, "step_s": 0.0, "decode_s": 0.0, "failed_decodes": 0,  # bench.py reads them
                      "prepares": 0, "prepare_s": 0.0, "rejected_draws": 0}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, warm_up_prompt: list[int]) -> None:
        """Measure this machine's speed, then serve. Every decode runs on the engine's own thread:
        llama.cpp's OpenMP workers spin for the thread that last used them, so decoding from a second
        thread made each step 2x slower on 2 cores."""
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(warm_up_prompt, ready), name="llama-engine",
                                        daemon=True)
        self._thread.start()
        ready.result()

    # --- what other threads call ----------------------------------------------------------------------
    def submit(self, hard: float, prepare: Callable[[Load], Job], floor_s: tuple[float, float],
               priority: float, prompt_tokens: int = 0, cancelled: threading.Event | None = None) -> Ticket:
        """Queue a request; refuse it at once (BackendBusy) when it cannot be answered before `hard`.
        floor_s: its smallest answer's time decoding alone, and beside `parallel` others."""
        with self.admission.cond:
            if not self.alive():
                raise BackendError(f"the llama.cpp engine has stopped: {self.stopped_because or 'shutting down'}")
            ticket = self.admission.ticket(hard, prepare, floor_s, priority, prompt_tokens, cancelled)
            self.admission.queue(ticket, self.kv.slots, self.speed)
        return ticket

    def alive(self) -> bool:
        """Serving: warmed up, and neither stopped nor closed."""
        return self._ready.is_set() and self._thread.is_alive() and not self.admission.closed

    def active(self) -> int:
        return len(self.kv.busy())

    def waiting(self) -> int:
        return len(self.admission.waiting)

    def prefill_share(self) -> float:
        return self.admission.prefill_share()

    def forget_cached(self) -> None:
        """Drop every cached prompt, so the next request starts from an empty cache (bench.py's fair start).
        Only while idle: then the engine thread is waiting and touches no cell."""
        with self.admission.cond:
            if self.active() or self.admission.waiting:
                raise BackendError("forget_cached needs an idle engine")
            self.kv.forget_cached()

    def close(self) -> None:
        self.admission.close(BackendError("the llama.cpp engine is shutting down"))
        if self._thread is not None:
            self._thread.join()
        self.batch.close()

    # --- the loop ---------------------------------------------------------------------------------------
    def _run(self, warm_up_prompt: list[int], ready: Future) -> None:
        try:
            self.speed = warm_up.measure(self.ctx, self.batch, warm_up_prompt, self.parallel)
        except Exception as e:
            ready.set_exception(e)
            return
        self._ready.set()
        ready.set_result(None)
        try:
            while True:
                with self.admission.cond:
                    while not self.admission.closed and not self.admission.waiting and not self.active():
                        self.admission.cond.wait()
                    if self.admission.closed:
                        break
                self._admit()
                if self.active():
                    self._serve_step()
        except Exception as e:  # a broken context: every caller hears of it, nobody hangs
            log.exception("the llama.cpp engine stopped")
            self.stopped_because = f"{type(e).__name__}: {e}"
            self.admission.close(BackendError(f"the llama.cpp engine stopped: {self.stopped_because}"))
            self._deliver()
            self._fail_all(BackendError(f"the llama.cpp engine stopped: {self.stopped_because}"))
        finally:
            self._fail_all(BackendError("the llama.cpp engine is shutting down"))

    def _admit(self) -> None:
        """Tickets join while slots are free and promises allow; each is prepared (sized, its prompt and
        constraint built: milliseconds) outside the lock that submit() and every step need."""
        while True:
            with self.admission.cond:
                taken = self.admission.next(self.kv.slots, self.speed)
            if taken is None:
                return
            ticket, load = taken
            running = self.active()
            started = time.perf_counter()
            job = None
            try:
                try:
                    job = ticket.prepare(load)
                except BackendBusy as busy:
                    if isinstance(busy, DoesNotFit) or load.sequences <= running + 1:
                        raise
                    job = ticket.prepare(Load(load.now, running + 1, load.kv_room, load.prefill_share))  # the load there
                with self.admission.cond:
                    self.kv.place(job, ticket)
            except BackendBusy as busy:  # not beside these answers: back in line until fewer decode
                if running and not isinstance(busy, DoesNotFit):
                    with self.admission.cond:
                        self.admission.wait_for_fewer(ticket, running)
                else:
                    ticket.future.set_exception(busy)
            except Exception as e:  # this request's failure only: the engine and its cache serve on
                if job is not None:
                    job.sampler.close()
                if not isinstance(e, BackendError):
                    log.exception("could not prepare or place a request")
                ticket.future.set_exception(e if isinstance(e, BackendError) else BackendError(
                    f"could not prepare or place the request: {type(e).__name__}: {e}"))
            finally:
                self.stats["prepares"] += 1
                self.stats["prepare_s"] += time.perf_counter() - started

    def _serve_step(self) -> None:
        """One step. A step that raises costs the answers in flight, not the engine, unless steps keep
        failing: then the context is broken and _run stops (the backend rebuilds it)."""
        try:
            self._step()
        except Exception as e:
            self._broken_steps += 1
            if self._broken_steps >= MAX_BROKEN_STEPS:
                raise
            log.exception("a llama.cpp step failed; the answers in it fail, the engine serves on")
            error = BackendError(f"the answer failed: {type(e).__name__}: {e}")
            for slot in self.kv.busy():
                self._release(slot).set_exception(error)
            self._deliver()
            self.kv.clear()

    def _step(self) -> None:
        started = time.perf_counter()
        with self.admission.cond:  # submit() reads the slots' jobs while it estimates waits
            if not self.admission.waiting:  # a waiting request takes the lowest free slot itself
                self.kv.compact()
        entries = self._build()
        whole = False
        if entries:
            self.clock.begin(self._planned(entries))
            try:
                decoded, whole = self._decode(entries)
            finally:
                self.clock.end()
            self._broken_steps = 0 if decoded else self._broken_steps + 1  # nothing decoded: a broken context?
            if self._broken_steps >= MAX_BROKEN_STEPS:
                raise LlamaError(f"{MAX_BROKEN_STEPS} steps in a row decoded nothing; the last failure: "
                                 f"{self._undelivered[-1][1] if self._undelivered else 'unknown'}")
        self._deliver()
        self._enforce_limits()
        seconds = time.perf_counter() - started
        self.stats["steps"] += 1
        self.stats["step_s"] += seconds
        copied, self.kv.copied = self.kv.copied, False
        if whole and not copied:  # llama.cpp copied a whole KV stream inside this decode: not a step's time
            self._observe(entries, seconds)

    def _build(self) -> list[Entry]:
        """Every decoding sequence's pending tokens, then prompt chunks in the order requests arrived."""
        entries: list[Entry] = []
        room = self.batch.capacity
        for slot in self.kv.busy():
            job = slot.job
            if job.done_prompt < len(job.prompt) or not job.pending or room <= 0:
                continue
            # Forced text longer than the batch goes in parts; the sequence draws after its last part.
            part = job.pending[:room]
            entries.append(Entry(slot, part, False, len(part) == len(job.pending)))
            room -= len(part)
        # Prompt chunks are kept short enough that neither the decoding slots nor a newly arrived request
        # (admitted, or refused, between steps) wait long for a step to end.
        budget = min(room, max(32, int(self.speed.prefill_tps * STALL_S)))
        for slot in sorted((s for s in self.kv.busy() if s.job.done_prompt < len(s.job.prompt)),
                           key=lambda s: s.ticket.order):
            if budget <= 0:
                break
            if self.kv.leader_ahead(slot):
                continue  # the same prompt start is being evaluated for another request: wait and copy it
            self.kv.borrow(slot)
            job = slot.job
            chunk = job.prompt[job.done_prompt:job.done_prompt + budget]
            entries.append(Entry(slot, chunk, True, job.done_prompt + len(chunk) == len(job.prompt)))
            budget -= len(chunk)
        return entries

    def _planned(self, entries: list[Entry]) -> float:
        """What the time model expects of a step of these entries (the stall watch allows 10x as long)."""
        decoding = [e for e in entries if not e.prompt]
        prompt = sum(len(e.tokens) for e in entries if e.prompt)
        forced = sum(len(e.tokens) - 1 for e in decoding)
        step = self.speed.step_s(len(decoding), sum(len(e.slot.cached) for e in decoding)) if decoding else 0.0
        return step + prompt / self.speed.prefill_tps + forced * self.speed.forced_s

    def _decode(self, entries: list[Entry]) -> tuple[bool, bool]:
        """Decode the entries, then draw for each; a failure goes to _recover. Returns (anything decoded,
        decoded whole on the first try)."""
        entries = [e for e in entries if e.slot.job is not None]  # a retry's part may have lost some
        if not entries:
            return False, False
        self.batch.clear()
        rows = {}
        for e in entries:
            row = self.batch.add(e.tokens, e.slot.seq, len(e.slot.cached), logits_last=e.samples)
            if e.samples:
                rows[e.slot.seq] = row
        started = time.perf_counter()
        try:
            self.ctx.decode(self.batch)
        except LlamaError as error:
            self.stats["decode_s"] += time.perf_counter() - started
            self.kv.restore([e.slot for e in entries])
            return self._recover(entries, error), False
        self.stats["decode_s"] += time.perf_counter() - started
        for e in entries:
            self.kv.hold(e.slot, e.tokens, e.prompt)
        for e in entries:
            if e.samples and e.slot.job is not None:
                self._draw(e.slot, rows[e.slot.seq])
        return True, True

    def _recover(self, entries: list[Entry], error: LlamaError) -> bool:
        """As llama.cpp's server does: a batch that failed is decoded again in halves, down to one sequence;
        a sequence that fails alone fails its own request only. With no room in a unified cache, the
        cached prompts of free slots are dropped first. Returns whether any part decoded."""
        self.stats["failed_decodes"] += 1
        log.warning("llama_decode failed for %d sequences (%s); retrying in smaller batches", len(entries), error)
        if isinstance(error, NoKvRoom) and self.ctx.kv_unified and self.kv.drop_idle():
            return self._decode(entries)[0]
        if len(entries) == 1:
            kind = BackendBusy if isinstance(error, NoKvRoom) else BackendError
            self._undelivered.append((self._release(entries[0].slot), kind(
                f"{'busy: ' if kind is BackendBusy else ''}llama.cpp could not decode this answer: {error}")))
            return False
        half = len(entries) // 2
        decoded = [self._decode(part)[0] for part in (entries[:half], entries[half:])]
        return any(decoded)

    def _draw(self, slot: Slot, row: int) -> None:
        job = slot.job
        try:
            before = job.rejected
            reason = sampling.draw(job, self.ctx, row, self.model)
            self.stats["rejected_draws"] += job.rejected - before
        except Exception as error:  # a constraint's failure costs its own request, not the engine
            log.exception("seq %d: the answer failed", slot.seq)
            self._release(slot).set_exception(BackendError(f"the answer failed: {type(error).__name__}: {error}"))
            return
        if reason is not None:
            self._finish(slot, reason)

    def _observe(self, entries: list[Entry], seconds: float) -> None:
        """What the step teaches the time model: prompt speed from steps that are mostly prompt, a step's time
        from steps of one token a sequence, what forced tokens add from steps of drawn and forced tokens."""
        prompt_tokens = sum(len(e.tokens) for e in entries if e.prompt)
        decoding = [e for e in entries if not e.prompt]
        extra = sum(len(e.tokens) - 1 for e in decoding)  # forced text beside the one drawn token each
        cells = sum(len(e.slot.cached) for e in decoding)
        if prompt_tokens:
            self.admission.track_prefill(prompt_tokens / self.speed.prefill_tps)
        if prompt_tokens >= 16:
            self.speed.observe_prefill(prompt_tokens + extra + len(decoding), seconds)
        elif decoding and not prompt_tokens:
            if extra:
                self.speed.observe_forced(len(decoding), extra, seconds, cells)
            else:
                self.speed.observe_step(len(decoding), seconds, cells)

    def _enforce_limits(self) -> None:
        """Answers past their hard limit, or whose caller has gone, leave their slots now; waiting tickets
        that can no longer finish are let go."""
        now = time.monotonic()
        for slot in self.kv.busy():
            job = slot.job
            if slot.ticket.cancelled.is_set():
                self._release(slot).set_exception(BackendError(
                    f"cancelled after {len(job.out)} tokens: the caller has gone away"))
            elif now >= slot.ticket.hard:  # overload, not a fault: the chain moves on with no cool-down
                self._release(slot).set_exception(BackendBusy(
                    f"busy: the hard limit passed after {len(job.out)} tokens (planned: {job.note})"))
        self.admission.drop_late(now)

    def _finish(self, slot: Slot, reason: str) -> None:
        job, ticket = slot.job, slot.ticket
        if reason == "stop" and job.cost is not None:
            self.admission.fill.learn(job.shape, len(job.out), job.cost.tokens)
        self._release(slot).set_result(sampling.result(job, ticket, reason))

    def _release(self, slot: Slot) -> Future:
        with self.admission.cond:
            future = slot.ticket.future
            slot.job.sampler.close()
            now = time.monotonic()
            self.admission.track_load(now, self.active())  # the load until now, the leaving answer included
            self.kv.release(slot)
        return future

    def _deliver(self) -> None:
        undelivered, self._undelivered = self._undelivered, []
        for future, error in undelivered:
            future.set_exception(error)

    def _fail_all(self, error: BackendError) -> None:
        self.admission.close(error)
        for slot in self.kv.busy():
            self._release(slot).set_exception(error)

