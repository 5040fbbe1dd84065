"""Who waits, who joins next, and the promises kept to answers already decoding.

A request arrives as a ticket. It is refused at once (busy) when it could not start and write its smallest
answer before its hard limit; otherwise it waits, the caller with more stake first, then by arrival, and
joins only while every answer already decoding still makes its hard limit beside it. It is planned for the
load it will run under: the sequences decoding now, or the recent average when that is higher (requests
come in waves). A waiting ticket that can no longer finish, or whose caller has gone, is let go. All times
come from the engine's one time model (sizing.Speed).
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import Callable

from backends.base import BackendBusy, BackendError
from backends.engine.work import Job, Load, Slot, Ticket
from backends.sizing import Fill, Speed

LOAD_WINDOW_S = 60.0  # the recent load that answers are planned for
MAX_PREFILL_SHARE = 0.5


class Admission:
    """The waiting queue and the load; `cond` guards it and the slots' job and ticket fields."""

    def __init__(self, parallel: int, kv_room: int):
        self.parallel, self.kv_room = parallel, kv_room
        self.cond = threading.Condition()
        self.waiting: list[Ticket] = []
        self.closed = False
        self.fill = Fill()
        self._arrivals = itertools.count()
        self._load_avg, self._load_at = 0.0, time.monotonic()
        self._prefill_s, self._prefill_at = 0.0, time.monotonic()

    def ticket(self, hard: float, prepare: Callable[[Load], Job], floor_s: tuple[float, float], priority: float,
               prompt_tokens: int, cancelled: threading.Event | None) -> Ticket:
        return Ticket((-priority, next(self._arrivals)), hard, prepare, *floor_s, prompt_tokens=prompt_tokens,
                      cancelled=cancelled or threading.Event())

    def queue(self, ticket: Ticket, slots: list[Slot], speed: Speed) -> None:
        """Under cond: queue the ticket, or refuse it (BackendBusy) when it could not be answered in time."""
        busy = sum(s.ticket is not None for s in slots)
        wait = self.expected_wait(ticket, slots, speed)
        if wait > 0 and time.monotonic() + wait + ticket.floor_full_s > ticket.hard:  # else admission decides
            raise BackendBusy(f"busy: {busy} answers decoding and {len(self.waiting)} waiting; "
                              f"this one could start in {wait:.0f} s and needs "
                              f"{ticket.floor_full_s:.0f} s at its smallest, past its limit")
        heapq.heappush(self.waiting, ticket)
        self.cond.notify()

    def expected_wait(self, ticket: Ticket, slots: list[Slot], speed: Speed) -> float:
        """Until a slot frees for this ticket: each busy slot frees when its answer has likely written what
        answers to its schema usually do, all decoding at full load from the cells held now, and by its hard
        limit at the latest; a free slot opens now, or, while the first in line waits on a running answer's
        promise, when the first running answer ends; each ticket ahead then holds a slot for its smallest
        answer's time at full load (one waiting for fewer answers to decode lets this one by)."""
        now = time.monotonic()
        share = self.prefill_share()
        busy = [s for s in slots if s.ticket is not None and s.job is not None]
        cells = sum(len(s.cached) for s in busy)
        ends = [min(now + speed.planned(s.job.left(self.fill.expected(s.job.shape), Fill.MARGIN),
                                        len(s.job.prompt) - s.job.done_prompt, self.parallel, share, cells),
                    s.ticket.hard) for s in busy]
        ahead = sorted(t for t in self.waiting if t < ticket and t.joins_below is None)
        # The first in line waiting on a running answer's promise: no free slot is taken before one ends.
        opens = (min(ends) if ends and ahead and self.broken_promise(now, slots, len(busy) + 1,
                                                                        ahead[0].prompt_tokens, speed) else now)
        frees = ends + [opens] * (len(slots) - len(busy))
        heapq.heapify(frees)
        for t in ahead:
            heapq.heappush(frees, min(heapq.heappop(frees) + t.floor_full_s, t.hard))  # done by its limit
        return frees[0] - now

    def broken_promise(self, now: float, slots: list[Slot], sequences: int, prompt_tokens: int,
                       speed: Speed) -> Slot | None:
        """The running answer that would miss its hard limit if `sequences` decoded from now on and a
        newcomer's prompt took its turn: each is held to its planned worst case, as it was admitted."""
        share = self.prefill_share()
        for slot in slots:
            job = slot.job
            if job is None:
                continue
            prompts = len(job.prompt) - job.done_prompt + prompt_tokens
            # held to its worst case, the others taken alike: a promise errs on the safe side
            cells = sequences * len(slot.cached)
            if now + speed.planned(job.left(), prompts, sequences, share, cells) > slot.ticket.hard:
                return slot
        return None

    def next(self, slots: list[Slot], speed: Speed) -> tuple[Ticket, Load] | None:
        """Under cond: the ticket that joins now and the load to plan it for, taken off the queue; None while
        no slot is free, nobody waits, or the first in line would break a running answer's promise (it
        waits while it can still finish: drop_late lets it go when not)."""
        self.drop_cancelled()
        free = [s for s in slots if s.ticket is None]
        if not self.waiting or not free:
            return None
        now = time.monotonic()
        running = len(slots) - len(free)
        # A ticket waiting for fewer answers does not hold up those behind it: they may fit beside these.
        ticket = next((t for t in sorted(self.waiting) if t.joins_below is None or running < t.joins_below), None)
        if ticket is None:
            return None
        if running and self.broken_promise(now, slots, running + 1, ticket.prompt_tokens, speed):
            return None
        self._remove([ticket])
        self.track_load(now, running)
        # Planned for the recent average load too: requests come in waves, and a wave's first one would
        # otherwise be sized as if it were to decode alone. Never refused for a load not there (the caller
        # plans again at running + 1 when this load says busy).
        sequences = min(self.parallel, max(running + 1, math.ceil(self._load_avg)))
        return ticket, Load(now=now, sequences=sequences, kv_room=self.kv_room, prefill_share=self.prefill_share())

    def wait_for_fewer(self, ticket: Ticket, running: int) -> None:
        """Under cond: a ticket whose smallest answer does not fit beside `running` others goes back in line
        until fewer decode (it fit alone when it came: drop_late lets it go once it no longer does)."""
        ticket.joins_below = running
        heapq.heappush(self.waiting, ticket)

    def track_load(self, now: float, decoding: int) -> None:
        """A running average of decoding sequences over the last minute or so: `decoding` is how many decoded
        since the last change (so a release counts the answer that is leaving)."""
        weight = 1.0 - math.exp(-(now - self._load_at) / LOAD_WINDOW_S)
        self._load_avg += weight * (decoding - self._load_avg)
        self._load_at = now

    @property
    def load_avg(self) -> float:
        return self._load_avg

    def prefill_share(self) -> float:
        """Seconds a second spent on prompts over the last minute or so: decoding gets the rest. Requests
        arrive while an answer is written, and their prompts take turns with its steps."""
        with self.cond:
            decayed = self._prefill_s * math.exp(-(time.monotonic() - self._prefill_at) / LOAD_WINDOW_S)
        return min(decayed / LOAD_WINDOW_S, MAX_PREFILL_SHARE)

    def track_prefill(self, seconds: float) -> None:
        now = time.monotonic()
        with self.cond:
            self._prefill_s = self._prefill_s * math.exp(-(now - self._prefill_at) / LOAD_WINDOW_S) + seconds
            self._prefill_at = now

    def drop_cancelled(self) -> None:
        """Under cond: waiting tickets whose callers have gone are answered and dropped."""
        gone = [t for t in self.waiting if t.cancelled.is_set()]
        if gone:
            self._remove(gone)
        for ticket in gone:
            ticket.future.set_exception(BackendError("cancelled: the caller has gone away"))

    def drop_late(self, now: float) -> None:
        """Estimates were wrong: a waiting ticket that can no longer finish is let go now."""
        with self.cond:
            self.drop_cancelled()
            late = [t for t in self.waiting if t.hard - now < t.floor_s]
            self._remove(late)
        for ticket in late:
            ticket.future.set_exception(BackendBusy(
                f"busy: waited {now - ticket.arrived:.0f} s and can no longer finish before its limit"))

    def _remove(self, tickets: list[Ticket]) -> None:
        if tickets:
            self.waiting = [t for t in self.waiting if t not in tickets]
            heapq.heapify(self.waiting)

    def close(self, error: BackendError) -> None:
        """No more tickets; every waiting one hears `error`."""
        with self.cond:
            self.closed = True
            waiting, self.waiting = self.waiting, []
            self.cond.notify_all()
        for ticket in waiting:
            if not ticket.future.done():
                ticket.future.set_exception(error)
