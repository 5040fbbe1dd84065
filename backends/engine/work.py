"""The records of one request that the engine's rooms share: the Ticket admission queues, the Load it is
planned against, the Job its backend prepares from it, the Slot of the KV cache it decodes in, the Result it
ends with. Kept apart from the rooms (admission, kv, sampling), so each room imports this and none imports
another: no room's code is needed to read a request's state.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.constraint import Matcher
from backends.llama_lowlevel import SamplerChain
from backends.sizing import Cost


@dataclass(frozen=True)
class Load:
    """What a request is planned against when it is admitted."""
    now: float
    sequences: int  # sequences expected to decode beside it, itself included
    kv_room: int  # KV cells of its slot, prompt included
    prefill_share: float = 0.0  # of the time, what other requests' prompts took lately: not decoding


@dataclass(order=True)
class Ticket:
    order: tuple[float, int]  # (-priority, arrival number): the heap's order
    hard: float = field(compare=False)  # time.monotonic() the answer must be back by
    prepare: Callable[[Load], Job] = field(compare=False)  # raises BackendBusy when it cannot fit
    floor_s: float = field(compare=False)  # its smallest answer's time decoding alone
    floor_full_s: float = field(compare=False)  # ... and beside `parallel` others, as when it had to wait
    prompt_tokens: int = field(compare=False, default=0)  # as asked: what its prefill will cost the others
    cancelled: threading.Event = field(compare=False, default_factory=threading.Event)  # its caller has gone
    joins_below: int | None = field(compare=False, default=None)  # fits only while fewer answers decode
    future: Future = field(compare=False, default_factory=Future)
    arrived: float = field(compare=False, default_factory=time.monotonic)


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


@dataclass
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds
    job: Job | None = None
    ticket: Ticket | None = None
    last_used: float = 0.0
