"""The llama.cpp engine's own process: `python -m backends.llama_runner --conn FD --clock FD`, started and
watched by backends/llama_process.py (as ollama runs each model in a runner subprocess, and vLLM its engine
core in a process of its own). It loads the model with the backend of backends/llama_cpp.py, marks every
step in the shared step clock, and answers the supervisor's calls over one multiprocessing Connection:
a request and its answer cross once each, never a token at a time.

Messages, all pickled by multiprocessing.connection:
    supervisor -> runner   ("start", LlamaCppSettings)       first, once
                           ("call", id, method, args)        one of METHODS, each on a thread of its own;
                                                             "ping" is answered at once
                           ("cancel", id)                    the caller of a generate call has gone away
                           ("close",)                        fail what is in flight, unload, exit 0
    runner -> supervisor   ("ready", facts) | ("failed", error)
                           ("reply", id, value) | ("raise", id, error)

The runner ignores SIGINT (the miner settles its answers first, then closes it) and dies with the miner:
it exits when the connection closes, and on Linux the kernel kills it when its parent dies.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import logging
import mmap
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable

from backends import llama_lowlevel as ll  # the package loads llama_cpp first (backends/__init__.py)
from backends.base import BackendError
from backends.engine.step_clock import StepClock
from backends.llama_cpp import LlamaCppBackend

log = logging.getLogger(__name__)

FAULT_ENV = "STORYNET_ENGINE_FAULT"  # tests only; see inject_fault
MAX_CALLS = 64  # calls served at once: requests wait in the engine's own queue, not here
CLOCK_BYTES = mmap.PAGESIZE
PR_SET_PDEATHSIG = 1

METHODS: dict[str, Callable[..., Any]] = {
    "generate": lambda b, request: b.generate(request),
    "health": lambda b: b.health(),
    "gauges": lambda b: b.gauges(),
    # bench.py's levers, as on a backend in its own process
    "forget_cached": lambda b: b.engine.forget_cached(),
    "set_seed": lambda b, seed: setattr(b, "seed", seed),
    "stats": lambda b: dict(b.engine.stats),
    "prompt_tokens": lambda b, messages: b.prompt_tokens(messages),
}


def inject_fault(spec: str, armed: threading.Event) -> None:
    """Tests only: `stall:N` makes the N-th llama_decode after the warm-up sleep for an hour (a kernel that
    never returns), `abort:N` abort the process inside it (as ggml_abort does on a CUDA error). Read once,
    from the environment the supervisor gives this process; no setting or request reaches it."""
    kind, _, after = spec.partition(":")
    if kind not in ("stall", "abort") or not after.isdigit():
        raise SystemExit(f"{FAULT_ENV}={spec!r}: expected stall:N or abort:N")
    count, original = itertools.count(1), ll.Context.decode

    def decode(self: ll.Context, batch: ll.Batch) -> None:
        if armed.is_set() and next(count) == int(after):
            log.warning("injected fault: %s inside llama_decode", kind)
            if kind == "abort":
                os.abort()
            time.sleep(3600)
        original(self, batch)

    ll.Context.decode = decode


def sendable(error: BaseException) -> BaseException:
    """The error itself when it pickles (the miner's errors do), else a BackendError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return BackendError(f"{type(error).__name__}: {error}")


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Runner:
    def __init__(self, conn: Connection, clock: StepClock):
        self.conn, self.clock = conn, clock
        self.backend: LlamaCppBackend | None = None
        self._send_lock = threading.Lock()
        self._cancels: dict[int, threading.Event] = {}
        self._pool = ThreadPoolExecutor(MAX_CALLS, thread_name_prefix="call")

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    def start(self) -> bool:
        armed = threading.Event()
        if os.environ.get(FAULT_ENV):
            inject_fault(os.environ[FAULT_ENV], armed)
        kind, settings = self.conn.recv()
        assert kind == "start", kind
        try:
            self.backend = LlamaCppBackend.from_settings(settings, clock=self.clock)
        except BaseException as e:  # the supervisor says why, in the operator's words: this process ends
            if not isinstance(e, BackendError):
                log.exception("the llama.cpp backend could not be built")
            self.send(("failed", sendable(e)))
            return False
        armed.set()
        self.send(("ready", self.backend.facts()))
        return True

    def serve(self) -> None:
        """Until the supervisor says close or goes away."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                log.warning("the miner has gone away; closing the engine")
                return
            if message[0] == "close":
                return
            if message[0] == "cancel":
                if (event := self._cancels.get(message[1])) is not None:
                    event.set()
                continue
            _, call_id, method, args = message
            if method == "ping":  # the supervisor's liveness check, answered here: the pool may be full
                self.send(("reply", call_id, None))
                continue
            if method == "generate":  # the caller's cancel event stays with it: cancellation comes as a message
                self._cancels[call_id] = threading.Event()
                args = (dataclasses.replace(args[0], cancelled=self._cancels[call_id]),)
            self._pool.submit(self._call, call_id, method, args)

    def _call(self, call_id: int, method: str, args: tuple) -> None:
        try:
            value = METHODS[method](self.backend, *args)
        except BaseException as e:
            reply: tuple = ("raise", call_id, sendable(e))
        else:
            reply = ("reply", call_id, value)
        finally:
            self._cancels.pop(call_id, None)
        try:
            self.send(reply)
        except (OSError, ValueError):  # the supervisor has gone; serve() ends on its own
            pass

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()  # fails every answer in flight: their calls reply with the error
        self._pool.shutdown(wait=True)
        self.conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conn", type=int, required=True, help="file descriptor of the supervisor's connection")
    parser.add_argument("--clock", type=int, required=True, help="file descriptor of the shared step clock")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [engine {os.getpid()}]: %(message)s")
    shared = mmap.mmap(args.clock, CLOCK_BYTES)
    os.close(args.clock)
    runner = Runner(Connection(args.conn), StepClock.from_buffer(shared))
    try:
        if not runner.start():
            return 1
        runner.serve()
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
