"""The ordered fallback chain: the first backend that can serve, in YAML order, answers.

A failure, a timeout, or an answer the caller's `accept` rejects moves on to the next backend while the
deadline allows. A rejected answer first gets one more try on the same backend, continuing from the part
worth keeping where the backend can (a schema-valid answer that breaks a rule the schema cannot say).
A backend that keeps failing, or fails its health check, is skipped for a cool-down and probed again
later (by a request once the cool-down ends, or by the next health check). A backend too busy to answer
in time is passed over with no cool-down, and counted apart from failures. Once the caller has gone away
(`request.cancelled`), no further backend is tried. Nothing is ever invented: when every backend fails,
the error says why for each.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from backends import REGISTRY, backend_class, build_backend
from backends.base import AnswerRejected, Backend, BackendBusy, BackendError, Generation, Health, Request
from backends.errors import AllBackendsFailed

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_SECONDS_TO_TRY = 1.0  # less than this left: another backend cannot answer in time


@dataclass
class BackendState:
    backend: Backend | None  # None: it could not be built (see build_error)
    label: str
    settings: Any = field(default=None, repr=False)  # its `backends:` entry, to build it again
    build_error: str | None = None
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    last_error: str | None = None
    served: int = 0
    busy: int = 0  # refusals for load (no time or no cache for the answer): not failures
    health: Health | None = None  # the last health check

    def cooling(self, now: float) -> bool:
        return now < self.cooldown_until

    def usable(self, now: float) -> bool:
        """Built, not failing its last health check, not on cool-down."""
        ok = self.health.ok if self.health is not None else True
        return self.backend is not None and ok and not self.cooling(now)

    @property
    def type(self) -> str:
        return self.backend.type if self.backend is not None else getattr(self.settings, "type", "?")

    @property
    def mode(self) -> str:
        return backend_class(self.type).mode if self.type in REGISTRY else "?"


@dataclass(frozen=True)
class BackendStatus:
    """One backend as the health report shows it."""
    name: str
    type: str
    mode: str
    ok: bool  # would serve a request now
    detail: str
    cooling_down_s: float
    served: int
    busy: int = 0  # a default: a running miner from before busy was counted still serves a readable report
    degraded: bool = False  # serves, but the detail names something to fix


def _build(settings: Any) -> BackendState:
    try:
        return BackendState(build_backend(settings), settings.label, settings)
    except BackendError as e:
        log.warning("backend %s is down: %s", settings.label, e)
        return BackendState(None, settings.label, settings, build_error=str(e))
    except Exception as e:  # a bug in one backend must not keep the others from serving
        log.exception("backend %s could not be built", settings.label)
        return BackendState(None, settings.label, settings, build_error=f"unexpected {type(e).__name__}: {e}")


class Chain:
    def __init__(self, states: list[BackendState], failures_before_cooldown: int = 2, cooldown_s: float = 60.0):
        if not states:
            raise BackendError("backends: the list is empty; name at least one backend in the YAML")
        self.states = states
        self.failures_before_cooldown = failures_before_cooldown
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, backend_settings, chain_settings, *, require_one: bool = True) -> Chain:
        """Build every backend; one that cannot be built is kept as down. With require_one, raise
        AllBackendsFailed when none can be built (a miner that could never answer should not start)."""
        states = [_build(settings) for settings in backend_settings]
        if require_one and all(s.backend is None for s in states):
            raise AllBackendsFailed([(s.label, s.build_error or "") for s in states])
        return cls(states, chain_settings.failures_before_cooldown, chain_settings.cooldown_s)

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self.states if s.backend is not None]

    def generate(self, request: Request, accept: Callable[[Generation], T]) -> tuple[T, Generation]:
        """Return accept(generation) from the first backend whose answer accept() takes."""
        reasons: dict[int, str] = {}  # by position in the YAML, so the final error reads in that order
        busy = failed = 0
        now = time.monotonic()
        # Backends on cool-down go last rather than never: better a probe than no answer.
        order = sorted(range(len(self.states)), key=lambda i: (self.states[i].backend is None,
                                                                self.states[i].cooling(now)))
        for i in order:
            state = self.states[i]
            if state.backend is None:
                reasons[i] = state.build_error or "not built"
                continue
            if request.cancelled.is_set():
                reasons[i] = "skipped: the caller has gone away"
                continue
            if request.seconds_left() < MIN_SECONDS_TO_TRY:
                reasons[i] = "skipped: the deadline had passed"
                continue
            if self._closed:
                reasons[i] = "skipped: the miner is shutting down"
                continue
            try:
                result, generation = self._ask(state, request, accept)
            except BackendBusy as e:  # too busy to answer in time: no reason to cool it down
                self._busy(state)
                reasons[i] = str(e)
                busy += 1
                continue
            except (BackendError, AnswerRejected) as e:
                reasons[i] = str(e)
            except Exception as e:  # a bug in one backend must not keep the next from answering
                log.exception("backend %s raised an unexpected error", state.label)
                reasons[i] = f"unexpected {type(e).__name__}: {e}"
            else:
                self._served(state)
                return result, generation
            failed += 1
            if request.cancelled.is_set():  # stopped because the caller left: says nothing of the backend
                continue
            self._failed(state, reasons[i])
        raise AllBackendsFailed([(self.states[i].label, reasons[i]) for i in sorted(reasons)],
                                busy=bool(busy) and not failed)

    def _ask(self, state: BackendState, request: Request, accept: Callable[[Generation], T]) -> tuple[T, Generation]:
        """One backend's answer, with one retry when accept() rejects it and time is left."""
        generation = state.backend.generate(request)
        try:
            return accept(generation), generation
        except AnswerRejected as e:
            if request.seconds_left() < MIN_SECONDS_TO_TRY or request.cancelled.is_set():
                raise
            log.info("backend %s: answer rejected (%s); trying once more%s", state.label, e,
                     " from where it went wrong" if e.retry_from else "")
            retry = request
            if e.retry_from and generation.schema is not None:  # continue under the schema it was held to
                messages = request.resize(generation.schema) if request.resize else request.messages
                retry = dataclasses.replace(request, messages=messages, prefix=e.retry_from,
                                            schema=generation.schema, resize=None)
            try:
                generation = state.backend.generate(retry)
            except BackendBusy:  # no time for it: the rejection is the news
                self._busy(state)
                raise e from None
            return accept(generation), generation

    def _failed(self, state: BackendState, error: str) -> None:
        with self._lock:
            state.consecutive_failures += 1
            state.last_error = error
            if state.consecutive_failures >= self.failures_before_cooldown:
                state.cooldown_until = time.monotonic() + self.cooldown_s
        log.warning("backend %s failed: %s", state.label, error)

    def _busy(self, state: BackendState) -> None:
        with self._lock:
            state.busy += 1

    def _served(self, state: BackendState) -> None:
        with self._lock:
            state.consecutive_failures = 0
            state.cooldown_until = 0.0
            state.served += 1

    def probe(self, *, rebuild: bool = True) -> list[Health]:
        """Check every backend now, one by one, and let the result steer the chain: a failed check puts
        the backend on cool-down, a passed one ends it. With rebuild, a backend that could not be built
        (model file missing, say) is built again, so a fixed problem heals without a restart."""
        results = []
        for i, state in enumerate(self.states):
            if state.backend is None and rebuild and state.settings is not None:
                fresh = _build(state.settings)
                state.backend, state.build_error = fresh.backend, fresh.build_error
            health = self._check(state)
            with self._lock:
                state.health = health
                if health.ok:
                    state.consecutive_failures, state.cooldown_until = 0, 0.0
                elif state.backend is not None:
                    state.last_error = health.detail
                    state.cooldown_until = time.monotonic() + self.cooldown_s
            results.append(health)
        return results

    @staticmethod
    def _check(state: BackendState) -> Health:
        if state.backend is None:
            return Health(False, state.build_error or "not built")
        try:
            return state.backend.health()
        except Exception as e:  # a health check that crashes is a failed check, never a healthy one
            log.exception("health check of backend %s raised", state.label)
            return Health(False, f"health check raised {type(e).__name__}: {e}")

    def snapshot(self) -> list[BackendStatus]:
        """Each backend's state now, in YAML order, as health reports it."""
        now = time.monotonic()
        rows = []
        with self._lock:
            for state in self.states:
                health = state.health or Health(state.backend is not None, state.build_error or "not checked yet")
                cooling = max(state.cooldown_until - now, 0.0)
                detail = health.detail
                if cooling and health.ok:
                    detail = f"skipped for {cooling:.0f} s after failing: {state.last_error}"
                rows.append(BackendStatus(state.label, state.type, state.mode, state.usable(now), detail,
                                          round(cooling, 1), state.served, state.busy, health.degraded))
        return rows

    def serving(self) -> BackendState | None:
        """The backend a request would go to first now, if any can serve."""
        now = time.monotonic()
        return next((state for state in self.states if state.usable(now)), None)

    def close(self) -> None:
        """Release every backend, once; a request still in the chain then gets an error, not another backend."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for backend in self.backends:
            backend.close()
