"""The llama.cpp backend as the miner runs it: the model and its engine in a child process
(backends/llama_runner.py) that this supervisor starts, watches and restarts, as ollama supervises its
runners. The miner's process keeps the Axon, the chain, health, /metrics and the other backends, so a
fault of llama.cpp's (a CUDA error aborts the whole process) costs the answers in flight, not the miner.

- Requests and answers cross a multiprocessing Connection over a socket pair, once each.
- The child marks each step in a StepClock on shared memory; a step that has run max(stall_s, 10x its
  planned time) means a decode that will not return (a driver fault): the child is killed.
- A child that dies or is killed fails every call in flight at once (the chain then asks the next backend,
  or the validator gets an error answer at once) and is started again: at once the first time, then
  backing off to once a minute while starts keep failing. Each death is logged once, with its cause, the
  child's exit signal and its last lines. While none serves, requests are refused as busy.
- health() is down while the engine stalls or restarts (saying how long the step has run or why the child
  died, and the restarts in the last hour), and degraded while GPU memory in use has grown past the plan
  or a GPU offload was asked for and no layer has a GPU.
`engine_process: false` keeps the engine in the miner's own process (LlamaCppBackend itself).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from typing import Any

from backends.base import (Backend, BackendBusy, BackendError, DeadlineExceeded, Gauges, Generation, Health, ModelInfo,
                           Request)
from backends.engine.step_clock import StepClock, stall_limit, stalled
from backends.llama_cpp import FUTURE_GRACE_S, LlamaCppBackend, LlamaCppSettings
from backends.llama_runner import CLOCK_BYTES, FAULT_ENV

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # load and warm-up: a 40 GB file read from a slow disk takes minutes
WATCH_EVERY_S = 0.25
PING_EVERY_S = 5.0  # a child that answers no ping for stall_s is stopped or hung outside a step: killed
SILENT_DOWN_S = 3.0  # no answer to a ping for this long: health says down until it answers or is replaced
CALL_TIMEOUT_S = 45.0  # health (a two-token generation when idle) and bench's calls
GAUGES_TIMEOUT_S = 1.0  # /metrics must answer even while the child is stopped
CLOSE_TIMEOUT_S = 30.0  # the child fails its answers, unloads and exits
BACKOFF_MAX_S = 60.0
HEALTHY_RESET_S = 300.0  # a child that served this long resets the back-off
TAIL_LINES = 12
HOUR_S = 3600.0


def exit_cause(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def backoff_s(failures: int) -> float:
    """Seconds before the next start after `failures` deaths or failed starts in a row: the first restart is
    immediate, then 1, 2, 4 ... up to a minute."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 2), BACKOFF_MAX_S)


def vram_verdict(used_before: int | None, used_now: int | None, planned: int, margin: float) -> str | None:
    """What to tell the operator when GPU memory in use has grown past the plan since the model loaded;
    None while it has not (or nothing can be measured)."""
    if used_before is None or used_now is None or planned <= 0:
        return None
    grown = used_now - used_before
    if grown <= planned * (1 + margin):
        return None
    mib = 2 ** 20
    return (f"GPU memory in use has grown by {grown / mib:,.0f} MiB since the model loaded, against a plan of "
            f"{planned / mib:,.0f} MiB (vram_margin {margin:.0%}): another process on the card or the engine's "
            f"memory growing (`nvidia-smi` shows which); restarting the miner gives the engine's back")


class Child:
    """One engine process: its connection, its step clock, the calls it owes, its last lines of output."""

    def __init__(self, settings: LlamaCppSettings, fault: str | None):
        ours, theirs = socket.socketpair()
        clock_fd, path = tempfile.mkstemp(prefix="storynet-step-clock-")
        os.unlink(path)  # the two mappings keep it; nothing is left on disk
        os.ftruncate(clock_fd, CLOCK_BYTES)
        self._map = mmap.mmap(clock_fd, CLOCK_BYTES)
        self.clock = StepClock.from_buffer(self._map)
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        if fault:
            env[FAULT_ENV] = fault
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backends.llama_runner", "--conn", str(theirs.fileno()), "--clock",
                 str(clock_fd), "--log-level", level], pass_fds=(theirs.fileno(), clock_fd),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        finally:
            theirs.close()
            os.close(clock_fd)
        self.pid = self.proc.pid
        self.conn = Connection(ours.detach())
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.facts: dict[str, Any] = {}
        self.started = time.monotonic()
        self.answered = self.started  # time.monotonic() of its last reply to anything
        self._pinged = 0.0
        self._unanswered_since = 0.0  # the first ping sent after its last reply
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the calls owed
        self._send_lock = threading.Lock()
        self._gone: BackendError | None = None  # why calls fail from now on
        self.lost_because: str | None = None  # set by the supervisor when it gives the child up
        self._relay = threading.Thread(target=self._relay_output, name=f"engine-{self.pid}-output", daemon=True)
        self._relay.start()
        self._reader: threading.Thread | None = None

    def start(self, settings: LlamaCppSettings, timeout: float) -> None:
        """Send the settings and wait for the loaded model; BackendError (the child's own words) if it fails."""
        self.conn.send(("start", settings))
        deadline = time.monotonic() + timeout
        while not self.conn.poll(WATCH_EVERY_S):
            if self.proc.poll() is not None:
                self._relay.join(2)
                raise BackendError(f"the llama.cpp engine process {exit_cause(self.proc.returncode)} while loading "
                                   f"the model; its last lines: {' | '.join(self.tail) or '(none)'}")
            if time.monotonic() > deadline:
                raise BackendError(f"the llama.cpp engine process did not load the model in {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.wait(5)
            self._relay.join(2)
            raise BackendError(f"the llama.cpp engine process {exit_cause(self.proc.returncode)} while loading the "
                               f"model; its last lines: {' | '.join(self.tail) or '(none)'}") from None
        if kind == "failed":
            raise value if isinstance(value, BackendError) else BackendError(str(value))
        self.facts = value
        self._reader = threading.Thread(target=self._read, name=f"engine-{self.pid}-reader", daemon=True)
        self._reader.start()

    def _relay_output(self) -> None:
        """The child's log and llama.cpp's own lines go on to the miner's stderr; the last few are kept for
        the report of its death."""
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self.tail.append(line.rstrip())
            try:
                sys.stderr.write(line)
            except (ValueError, OSError):
                pass

    def _read(self) -> None:
        while True:
            try:
                kind, call_id, value = self.conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                self.fail_all(BackendError(f"the llama.cpp engine process {self.cause()}; the answer was lost"))
                return
            self.answered = time.monotonic()
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is not None:
                if kind == "reply":
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def ping(self, every: float) -> None:
        """Ask for a reply every `every` seconds without waiting for it: the reader notes when replies come."""
        now = time.monotonic()
        if now - self._pinged >= every:
            if self._pinged <= self.answered:
                self._unanswered_since = now
            self._pinged = now
            self._send_quietly(("call", -1, "ping", ()))

    def silent_s(self) -> float:
        """How long the child has left pings unanswered, from the first of them (0 while it keeps answering):
        counted from the latest ping instead, silence could never outgrow the time between two pings."""
        return time.monotonic() - self._unanswered_since if self._pinged > self.answered else 0.0

    def call(self, method: str, *args: Any, timeout: float, cancelled: threading.Event | None = None) -> Any:
        future: Future = Future()
        with self._lock:
            if self._gone is not None:
                raise BackendError(str(self._gone))
            call_id = next(self._ids)
            self._pending[call_id] = future
        try:
            with self._send_lock:
                self.conn.send(("call", call_id, method, args))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            with self._lock:
                self._pending.pop(call_id, None)
            raise BackendError(f"the request cannot be sent to the llama.cpp engine process: {e}") from None
        except (OSError, ValueError):
            pass  # the child is gone: the reader or the watch fails the call
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                return future.result(timeout=WATCH_EVERY_S)
            except FutureTimeout:
                pass
            if cancelled is not None and cancelled.is_set() and not told:
                told = True
                self._send_quietly(("cancel", call_id))
            if time.monotonic() > deadline:
                with self._lock:
                    self._pending.pop(call_id, None)
                self._send_quietly(("cancel", call_id))
                raise DeadlineExceeded(f"the llama.cpp engine process did not answer {method} in {timeout:.0f} s")

    def _send_quietly(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError):
            pass

    def fail_all(self, error: BackendError) -> None:
        """Every call in flight fails now with `error`, and every later one too."""
        with self._lock:
            if self._gone is None:
                self._gone = error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BackendError(str(error)))  # one each: a raised error carries its traceback

    def alive(self) -> bool:
        return self.proc.poll() is None and self._gone is None

    def cause(self) -> str:
        """Why a child that stopped answering is gone: the supervisor's reason, or what its exit says."""
        if self.lost_because:
            return self.lost_because
        try:
            return exit_cause(self.proc.wait(2))
        except subprocess.TimeoutExpired:
            return "closed its connection"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self, timeout: float) -> None:
        """Ask the child to fail its answers, unload and exit; kill it if it does not."""
        self._send_quietly(("close",))
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the llama.cpp engine process (pid %d) did not exit in %.0f s: killing it", self.pid, timeout)
            self.kill()
        self.release()

    def release(self) -> None:
        self.fail_all(BackendError("the llama.cpp engine process has stopped"))
        self.conn.close()
        if self._reader is not None:
            self._reader.join(5)
        self._relay.join(5)
        self.proc.stdout.close()  # the clock's mapping goes with the last reference to this child


class LlamaCppProcess(Backend):
    type = "llama_cpp"
    mode = "local"
    Settings = LlamaCppSettings

    def __init__(self, settings: LlamaCppSettings, fault: str | None = None):
        """fault (tests only): given to the first engine process, never to a restarted one."""
        super().__init__(settings.label)
        self.settings = settings
        self._lock = threading.Lock()
        self._starting: Child | None = None  # a child loading the model: close() must not wait minutes for it
        self._child: Child | None = self._spawn(fault)  # a first start that fails raises, as in-process
        self._info: ModelInfo = self._child.facts["info"]
        self._parallel: int = self._child.facts["parallel"]
        self._closed = False
        self._why = ""  # why the last child died
        self._restarts: deque[float] = deque()  # time.monotonic() of each restart
        self.restarts = 0
        self._failures = 0  # deaths and failed starts in a row
        self._wake = threading.Event()
        self._watch = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor", daemon=True)
        self._watch.start()

    @classmethod
    def from_settings(cls, settings: LlamaCppSettings) -> Backend:
        if not settings.engine_process:
            return LlamaCppBackend.from_settings(settings)
        return cls(settings)

    def _spawn(self, fault: str | None = None) -> Child:
        child = self._starting = Child(self.settings, fault)
        try:
            child.start(self.settings, START_TIMEOUT_S)
        except BaseException:
            child.kill()
            child.release()
            raise
        finally:
            self._starting = None
        log.info("%s: the llama.cpp engine serves from process %d", self.name, child.pid)
        return child

    # --- the watch ----------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._wake.wait(WATCH_EVERY_S):
            try:
                self._watch_once()
            except Exception:  # a bug here must not end the watch
                log.exception("%s: the engine process watch failed once", self.name)

    def _watch_once(self) -> None:
        child = self._child
        if child is None:
            self._restart()
            return
        if not child.alive():
            self._lost(child, child.cause())
            return
        running = stalled(child.clock, self.settings.stall_s)
        # every 5 s, or every half stall_s when that is shorter: a silent child is caught within 1.5 stall_s
        child.ping(min(PING_EVERY_S, self.settings.stall_s / 2))
        if running is not None:
            limit = stall_limit(child.clock.planned, self.settings.stall_s)
            self._lost(child, f"stalled: a step ran {running:.1f} s (limit {limit:.0f} s), so it was killed")
        elif child.silent_s() > self.settings.stall_s:
            self._lost(child, f"stopped answering: no reply to a ping in {child.silent_s():.0f} s, so it was killed")
        elif time.monotonic() - child.started > HEALTHY_RESET_S:
            self._failures = 0

    def _lost(self, child: Child, cause: str) -> None:
        """A child died or stalled: every call in flight fails now, it is killed, and a new one starts."""
        child.lost_because = cause
        child.fail_all(BackendError(f"the llama.cpp engine process {cause}; the answer was lost"))
        child.kill()
        with self._lock:
            if self._child is not child:
                return
            self._child, self._why = None, cause
            self._restarts.append(time.monotonic())
            self.restarts += 1
            self._failures += 1
        tail = "\n".join(f"    {line}" for line in child.tail) or "    (none)"
        log.error("%s: the llama.cpp engine process (pid %d) %s; %d restart(s) in the last hour; starting a new "
                  "one. Its last lines:\n%s", self.name, child.pid, cause, self._recent_restarts(), tail)
        child.release()

    def _restart(self) -> None:
        delay = backoff_s(self._failures)
        if delay and self._wake.wait(delay):
            return
        try:
            child = self._spawn()
        except BaseException as e:
            if self._closed:
                return
            with self._lock:
                self._failures += 1
                self._why = f"could not be started again: {e}"
            log.error("%s: the llama.cpp engine process %s; next try in %.0f s", self.name, self._why,
                      backoff_s(self._failures))
            return
        with self._lock:
            if self._closed:
                child.close(CLOSE_TIMEOUT_S)
                return
            self._child, self._info = child, child.facts["info"]
        log.warning("%s: the llama.cpp engine serves again from process %d (%d restart(s) in the last hour)",
                    self.name, child.pid, self._recent_restarts())

    def _recent_restarts(self) -> int:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > HOUR_S:
            self._restarts.popleft()
        return len(self._restarts)

    def _serving(self) -> Child:
        """The child that serves now; BackendBusy while none does (the next backend answers)."""
        child = self._child
        if self._closed:
            raise BackendError(f"{self.name}: the model is closed (the miner is shutting down)")
        if child is None or not child.alive():
            why = self._why if child is None else child.cause()
            raise BackendBusy(f"busy: {self.name}: the llama.cpp engine process is restarting (it {why})")
        return child

    # --- the backend interface ------------------------------------------------------------------------------
    def generate(self, request: Request) -> Generation:
        child = self._serving()
        payload = dataclasses.replace(request, cancelled=None)  # cancellation crosses as a message
        return child.call("generate", payload, timeout=max(request.seconds_left(), 0.0) + FUTURE_GRACE_S,
                          cancelled=request.cancelled)

    def call(self, method: str, *args: Any) -> Any:
        """One of the engine process's other calls (backends/llama_runner.py METHODS), for bench.py."""
        return self._serving().call(method, *args, timeout=CALL_TIMEOUT_S)

    def health(self) -> Health:
        child = self._child
        news = self._news()
        if self._closed:
            return Health(False, f"{self.name}: closed (the miner is shutting down)")
        if child is None or not child.alive():
            why = self._why if child is None else child.cause()
            return Health(False, f"{self.info().name}: the llama.cpp engine process is restarting: it {why}; "
                                 f"{news or 'restarting now'}")
        running = stalled(child.clock, self.settings.stall_s)
        if running is not None:
            return Health(False, f"{self.info().name}: stalled: a llama.cpp step has run {running:.0f} s; the "
                                 f"engine process is being restarted")
        if (silent := child.silent_s()) > SILENT_DOWN_S:
            return Health(False, f"{self.info().name}: the llama.cpp engine process has not answered a ping for "
                                 f"{silent:.0f} s; it is killed and restarted after {self.settings.stall_s:.0f} s")
        try:
            health: Health = child.call("health", timeout=CALL_TIMEOUT_S)
        except BackendError as e:
            return Health(False, f"{self.info().name}: the llama.cpp engine process did not answer a health check: {e}")
        if not health.ok:
            return health
        vram = self._check_vram(child)
        detail = "; ".join(filter(None, [health.detail, vram, news]))
        return Health(True, detail, degraded=health.degraded or vram is not None)

    def _news(self) -> str:
        recent = self._recent_restarts()
        return f"{recent} engine restart(s) in the last hour, the last after it {self._why}" if recent else ""

    def _check_vram(self, child: Child) -> str | None:
        if not child.facts.get("n_gpu_layers"):
            return None
        try:
            gauges: Gauges = child.call("gauges", timeout=GAUGES_TIMEOUT_S)
        except BackendError:
            return None
        used = gauges.gpu_memory[0] if gauges.gpu_memory else None
        return vram_verdict(child.facts.get("gpu_used_before_load"), used, child.facts["estimated_vram_bytes"],
                            self.settings.vram_margin)

    def info(self) -> ModelInfo:
        return self._info

    def gauges(self) -> Gauges:
        child = self._child
        if child is None or not child.alive():
            return Gauges(0, 0, {}, None, self.restarts)
        try:
            gauges: Gauges = child.call("gauges", timeout=GAUGES_TIMEOUT_S)
        except BackendError:  # stopped or busy beyond a second: what this side knows
            return Gauges(0, 0, {}, child.clock.last_step_age_s(), self.restarts)
        return dataclasses.replace(gauges, restarts=self.restarts)

    @property
    def pid(self) -> int | None:
        """The engine process serving now (None while it restarts)."""
        child = self._child
        return child.pid if child is not None else None

    @property
    def parallel(self) -> int:
        """Requests the engine decodes together."""
        return self._parallel

    @property
    def clock(self) -> StepClock | None:
        """The step clock of the engine serving now (None while it restarts)."""
        child = self._child
        return child.clock if child is not None else None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            child, self._child = self._child, None
        self._wake.set()
        if (starting := self._starting) is not None:
            starting.kill()
        self._watch.join()
        if child is not None:
            child.close(CLOSE_TIMEOUT_S)
