"""What the running miner has been doing, for its operator: which protocol versions validators send (a new
one is named the day it arrives), which requests were refused before an answer was tried and why, and the
last minutes' answers. Kept in memory at a lock and an append per request; `health --running` reads it
(miner/health.py) and /metrics counts the same events (miner/metrics.py).

Only callers the miner serves (validators; offline, the allowlist) can move the protocol and refusal rows:
anyone on the internet can send a malformed request, and only a validator's says the protocol moved.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from miner import PROTOCOLS
from miner.health import Check

if TYPE_CHECKING:
    from miner.metrics import Metrics

log = logging.getLogger(__name__)

SPOKEN = (*PROTOCOLS, "")  # validators may leave the version empty
SPEAKS = " and ".join(PROTOCOLS)
WINDOW_S = 600.0  # "the last ten minutes", against the ten before
FRESH_S = 3600.0  # a new version or a refusal seen within this keeps health degraded
MAX_LABELS = 16  # distinct versions remembered: a caller cannot grow memory or /metrics without end
OTHER = "other"
MAX_CALLERS = 256  # a subnet's uids: more distinct callers than that are not validators
UPDATE_FIX = ("update the miner: `git pull && scripts/setup.sh`, then restart it (pm2 restart, or "
              "systemctl restart storynet-miner)")
OUTCOMES = ("valid", "busy", "error")


def version_label(value: Any) -> str:
    """A request's protocol_version as a short label: malformed values are named, not echoed."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    return value if len(value) <= 24 and value.isprintable() else "malformed"


def _when(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class Seen:
    """A protocol version, or a reason for refusing, as validators brought it."""
    first: float  # wall clock
    last: float
    count: int = 0
    callers: set[str] = field(default_factory=set)
    text: str = ""  # a refusal: the first one's error

    def add(self, now: float, caller: str | None) -> None:
        self.count += 1
        self.last = now
        if caller and len(self.callers) < MAX_CALLERS:
            self.callers.add(caller)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Activity:
    """The record. `serves(hotkey)` says whether the miner answers that caller (the blacklist's verdict);
    `metrics` (miner/metrics.py), when given, counts every event too."""

    def __init__(self, serves: Callable[[str | None], bool], metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time):
        self.serves, self.metrics, self.clock = serves, metrics, clock
        self._lock = threading.Lock()
        self.versions: dict[str, Seen] = {}
        self.refusals: dict[str, Seen] = {}
        # (wall time, task, outcome, seconds, tokens) of the last two windows' answers, oldest first
        self._answers: deque[tuple[float, str, str, float, int]] = deque()

    def _version(self, value: Any, caller: str | None, now: float) -> None:
        label = version_label(value)
        with self._lock:
            if label not in self.versions and len(self.versions) >= MAX_LABELS:
                label = OTHER
            seen = self.versions.get(label)
            new = seen is None
            if new:
                seen = self.versions[label] = Seen(now, now)
            seen.add(now, caller)
        if self.metrics is not None:
            self.metrics.version(label)
        if new and label not in SPOKEN:
            log.warning("protocol drift: a validator (%s) sends protocol_version %r; this miner speaks %s. To "
                        "serve it, %s", caller, label, SPEAKS, UPDATE_FIX)

    def answered(self, task: str, outcome: str, backend: str, seconds: float, tokens: int, version: Any,
                 caller: str | None) -> None:
        """An answer forward gave (or its error). Callers here are served ones: the blacklist let them in."""
        now = self.clock()
        self._version(version, caller, now)
        with self._lock:
            self._answers.append((now, task, outcome, seconds, tokens))
            while self._answers and self._answers[0][0] < now - 2 * WINDOW_S:
                self._answers.popleft()
        if self.metrics is not None:
            self.metrics.answered(task, outcome, backend, seconds, tokens)

    def refused(self, reason: str, text: str, caller: str | None, version: Any = None) -> None:
        """A request refused before an answer was tried: at the Axon (it did not parse) or by the service
        (its task or fields are not the contract's). Counted only for callers the miner serves."""
        if not self.serves(caller):
            return
        now = self.clock()
        if version is not None:  # refused at the Axon; forward records the versions of those it saw
            self._version(version, caller, now)
        with self._lock:
            seen = self.refusals.get(reason)
            new = seen is None
            if new:
                seen = self.refusals[reason] = Seen(now, now, text=text[:300])
            seen.add(now, caller)
        if new:
            log.warning("a validator's request (%s) was refused before an answer was tried: %s: %s", caller,
                        reason, seen.text)
        if self.metrics is not None:
            self.metrics.refusal(reason)

    # --- what health shows ---------------------------------------------------------------------------
    def checks(self) -> tuple[Check, ...]:
        return self._protocol_check(), self._refusal_check()

    def _protocol_check(self) -> Check:
        now = self.clock()
        with self._lock:
            versions = {v: (s.count, len(s.callers), s.first, s.last) for v, s in self.versions.items()}
        if not versions:
            return Check("protocol", None, f"no request yet; this miner speaks {SPEAKS}")
        new = {v: s for v, s in versions.items() if v not in SPOKEN and now - s[3] < FRESH_S}
        if new:
            said = "; ".join(f"{v!r} from {_count(callers, 'validator')} since {_when(first)} "
                             f"({_count(count, 'request')})"
                             for v, (count, callers, first, _) in sorted(new.items(), key=lambda kv: kv[1][2]))
            return Check("protocol", False, f"validators send protocol {said}; this miner speaks {SPEAKS}: "
                         f"{UPDATE_FIX}",
                         "validators send a protocol this miner does not speak")
        spoken = ", ".join(f"{v or 'an empty version'} ({_count(s[0], 'request')})"
                           for v, s in sorted(versions.items(), key=lambda kv: -kv[1][0]))
        return Check("protocol", True, f"validators send {spoken}")

    def _refusal_check(self) -> Check:
        now = self.clock()
        with self._lock:
            refusals = sorted(((r, s.count, s.first, s.last, s.text) for r, s in self.refusals.items()),
                              key=lambda row: -row[1])
        if not refusals:
            return Check("refused", None, "no validator's request refused before an answer")
        counts = ", ".join(f"{count} {reason}" for reason, count, *_ in refusals)
        first = min(refusals, key=lambda row: row[2])
        detail = (f"{_count(sum(row[1] for row in refusals), 'request')} of validators: {counts}; the first: "
                  f"{first[0]}: {first[4]}")
        fresh = any(now - row[3] < FRESH_S for row in refusals)
        if fresh:
            return Check("refused", False, f"{detail}. If the protocol moved: {UPDATE_FIX}",
                         "validators' requests are refused before an answer")
        return Check("refused", True, f"none in the last hour; before: {detail}")

    def recent(self) -> dict[str, Any]:
        """The last WINDOW_S of answers per task, beside the WINDOW_S before them."""
        now = self.clock()
        with self._lock:
            answers = list(self._answers)
        times = [a[0] for a in answers]
        cut, start = bisect.bisect_left(times, now - WINDOW_S), bisect.bisect_left(times, now - 2 * WINDOW_S)
        windows = {"now": answers[cut:], "before": answers[start:cut]}
        tasks = sorted({a[1] for a in answers[start:]})
        table = {task: {name: _summary([a for a in rows if a[1] == task]) for name, rows in windows.items()}
                 for task in tasks}
        table["all"] = {name: _summary(rows) for name, rows in windows.items()}
        tokens = {name: round(sum(a[4] for a in rows) / WINDOW_S, 1) for name, rows in windows.items()}
        return {"window_s": WINDOW_S, "tasks": table, "tokens_per_s": tokens}


def _summary(rows: list[tuple[float, str, str, float, int]]) -> dict[str, Any]:
    seconds = [a[3] for a in rows if a[2] == "valid"]
    counts = {outcome: sum(1 for a in rows if a[2] == outcome) for outcome in OUTCOMES}
    p50, p95 = percentile(seconds, 0.5), percentile(seconds, 0.95)
    return {"served": counts["valid"], "busy": counts["busy"], "errors": counts["error"],
            "p50_s": None if p50 is None else round(p50, 2), "p95_s": None if p95 is None else round(p95, 2)}
