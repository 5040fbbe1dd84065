"""When the engine's current step began and how long it was planned to take, in memory another process can
read: the supervisor of an engine in a child process (backends/llama_process.py) reads it to catch a step
that never returns (a driver fault, a hung kernel), which no message from the child would ever announce.

A ctypes structure: in plain memory for an engine in the miner's own process, or laid over a shared
mapping (`StepClock.from_buffer(mmap)`) that both processes map. Times are time.monotonic(), which on Linux
and macOS is one clock for every process of the machine. Each field is one aligned 8-byte store, so a
reader never sees half a write; `planned` is written before `started`.
"""
from __future__ import annotations

import ctypes
import time

STALL_FLOOR_S = 20.0  # no step is called stalled sooner: a long prompt chunk on a slow card is not a fault
STALL_FACTOR = 10.0  # nor before it has run this many times its planned time


class StepClock(ctypes.Structure):
    _fields_ = [("started", ctypes.c_double),    # time.monotonic() the current step began; 0: no step running
                ("planned", ctypes.c_double),    # seconds the time model planned for it
                ("finished", ctypes.c_double),   # time.monotonic() the last step ended; 0: none yet
                ("steps", ctypes.c_uint64)]      # steps finished

    def begin(self, planned: float) -> None:
        self.planned = planned
        self.started = time.monotonic()

    def end(self) -> None:
        self.finished = time.monotonic()
        self.started = 0.0
        self.steps += 1

    def running_s(self, now: float | None = None) -> float:
        """How long the current step has run; 0 when none runs."""
        started = self.started
        return max((time.monotonic() if now is None else now) - started, 0.0) if started else 0.0

    def last_step_age_s(self, now: float | None = None) -> float | None:
        """Seconds since the last step ended; None before the first."""
        finished = self.finished
        return max((time.monotonic() if now is None else now) - finished, 0.0) if finished else None


def stall_limit(planned: float, floor: float = STALL_FLOOR_S) -> float:
    """How long a step may run before the engine counts as stalled: max(floor, 10x its planned time)."""
    return max(floor, STALL_FACTOR * planned)


def stalled(clock: StepClock, floor: float = STALL_FLOOR_S, now: float | None = None) -> float | None:
    """The running step's age when it is past its limit, else None."""
    running = clock.running_s(now)
    return running if running and running > stall_limit(clock.planned, floor) else None
