"""The KV side of the engine: slots and what their cells hold. The only code that edits llama.cpp's cache.

Each request holds a slot: a sequence id and its cells. With a KV stream per sequence, llama.cpp evaluates
consecutive sequence ids in one pass over the weights and a gap costs a second (docs/measurements.md), so a newcomer
takes the lowest free slot and, when a lower one frees and nobody waits, the highest busy sequence moves
down (its stream is copied). In a unified cache, a newcomer takes the free slot whose cells share most of
its prompt, else the least recently used. Either way a prompt keeps the cells of the earlier prompt on its
slot it shares a start with, checked against what llama.cpp says the sequence holds (as its server checks
llama_memory_seq_pos_min), and copies the start another slot holds when that is more (a burst of identical
requests evaluates its prompt once).
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

from backends.engine.work import Job, Slot, Ticket

log = logging.getLogger(__name__)

MIN_SHARED = 64  # prompt tokens worth copying from another sequence rather than evaluating


class Cells(Protocol):
    """What of a llama.cpp context the KV side uses (llama_lowlevel.Context; tests use a fake)."""
    n_ctx: int
    n_ctx_seq: int
    kv_unified: bool

    def positions(self, seq: int) -> tuple[int, int]: ...
    def forget(self, seq: int, start: int = 0) -> None: ...
    def share(self, src: int, dst: int, keep: int) -> None: ...
    def clear(self) -> None: ...


def shared(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KvCache:
    def __init__(self, ctx: Cells, parallel: int, share_prefixes: bool = True):
        self.ctx = ctx
        self.slots = [Slot(seq) for seq in range(parallel)]
        # A unified cache is one pool: each request keeps to its share of it, so the pool never runs out.
        self.room = ctx.n_ctx // parallel if ctx.kv_unified else ctx.n_ctx_seq
        self.share_prefixes = share_prefixes  # copy a prompt start another sequence holds (bench.py compares)
        self.copied = False  # a sequence's cells were copied since the last decode: that step is no step's time

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.ticket is not None]

    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.ticket is None]

    def place(self, job: Job, ticket: Ticket) -> Slot:
        """Put the job on a free slot, keeping what of its prompt that slot's cells hold. The slot is the job's
        only once its cells are known: an error on the way leaves it free."""
        free = self.free()
        if self.ctx.kv_unified:
            slot = max(free, key=lambda s: (shared(s.cached, job.prompt), -s.last_used))
        else:
            slot = min(free, key=lambda s: s.seq)
        # The last prompt token is always evaluated: its logits start the answer.
        keep = min(self._reusable(slot, job.prompt), len(job.prompt) - 1)
        slot.cached = []
        self.ctx.forget(slot.seq, keep)
        slot.cached = job.prompt[:keep]
        job.done_prompt, job.reused, job.started = keep, keep, time.monotonic()
        slot.job, slot.ticket = job, ticket
        log.debug("seq %d: %d prompt tokens (%d reused), max %d tokens; %s",
                  slot.seq, len(job.prompt), keep, job.max_tokens, job.note)
        return slot

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Prompt tokens the slot's cells hold, if llama.cpp holds what the slot says it does."""
        n = shared(slot.cached, prompt)
        if n and self.ctx.positions(slot.seq) != (0, len(slot.cached) - 1):
            log.warning("seq %d: llama.cpp holds positions %s, not 0..%d: its cells are not reused",
                        slot.seq, self.ctx.positions(slot.seq), len(slot.cached) - 1)
            return 0
        return n

    def compact(self) -> None:
        """With a stream per sequence, keep the busy sequence ids consecutive: when a lower one is free, the
        highest busy sequence moves there (its stream is copied; the old one stays as a cached prefix). The
        caller holds the lock submit() reads slots under, and calls this only when nobody waits for a slot."""
        if self.ctx.kv_unified:
            return
        free, busy = self.free(), self.busy()
        if not free or not busy:
            return
        low, high = min(free, key=lambda s: s.seq), max(busy, key=lambda s: s.seq)
        if low.seq > high.seq:
            return
        low.cached = []
        self.ctx.share(high.seq, low.seq, len(high.cached))
        self.copied = True
        low.cached, low.job, low.ticket = list(high.cached), high.job, high.ticket
        high.job = high.ticket = None
        high.last_used = time.monotonic()
        log.debug("seq %d moved to seq %d", high.seq, low.seq)

    def _shareable(self, job: Job, tokens: list[int]) -> int:
        """How much of job's prompt `tokens` starts with, when that is worth a copy; else 0."""
        n = min(shared(tokens, job.prompt), len(job.prompt) - 1)
        return n if n >= job.done_prompt + MIN_SHARED else 0

    def leader_ahead(self, slot: Slot) -> bool:
        """Whether a request ahead of this one is still evaluating a prompt start they share: then this one
        waits and copies it."""
        if not self.share_prefixes:
            return False
        job = slot.job
        return any(other is not slot and other.job is not None and other.ticket.order < slot.ticket.order
                   and other.job.done_prompt < self._shareable(job, other.job.prompt) for other in self.slots)

    def borrow(self, slot: Slot) -> None:
        """Copy the KV cells of the longest start of this prompt that another sequence holds; sampling stays
        each request's own."""
        if not self.share_prefixes:
            return
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
        self.copied = True
        slot.cached = job.prompt[:keep]
        job.reused += keep - job.done_prompt
        job.done_prompt = keep
        log.debug("seq %d: %d prompt tokens copied from seq %d", slot.seq, keep, best.seq)

    def hold(self, slot: Slot, tokens: list[int], prompt: bool) -> None:
        """A decode put these tokens of the slot's job in its cells."""
        job = slot.job
        slot.cached += tokens
        if prompt:
            job.done_prompt += len(tokens)
        else:
            job.pending = job.pending[len(tokens):]

    def restore(self, slots: list[Slot]) -> None:
        """Drop whatever a failed decode left in these sequences' cells past what each is known to hold."""
        for slot in slots:
            self.ctx.forget(slot.seq, len(slot.cached))

    def drop_idle(self) -> bool:
        """A unified cache out of room: drop the cached prompts of free slots; whether there were any."""
        idle = [s for s in self.free() if s.cached]
        for slot in idle:
            slot.cached = []
            self.ctx.forget(slot.seq)
        return bool(idle)

    def release(self, slot: Slot) -> None:
        slot.job = slot.ticket = None
        slot.last_used = time.monotonic()

    def clear(self) -> None:
        """Every slot's cells dropped: after a step failed, what they hold is unknown."""
        self.ctx.clear()
        for slot in self.slots:
            slot.cached = []

    def forget_cached(self) -> None:
        """Drop every cached prompt of free slots (bench.py's fair start)."""
        for slot in self.free():
            self.ctx.forget(slot.seq)
            slot.cached = []
