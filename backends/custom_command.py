"""A program the operator names: the request goes in as JSON on stdin, the answer comes out as JSON on
stdout. It lets a miner plug in anything (another runtime, a wrapper around an in-house service)
without touching this code.

stdin:  {"messages": [{"role": ..., "content": ...}], "schema": {...} or null, "max_tokens": int,
         "temperature": float, "top_p": float, "seconds_left": float}
stdout: {"text": "<the model's answer, e.g. the JSON object as a string>",
         "model": "<optional model name>", "prompt_tokens": int, "completion_tokens": int}
A non-zero exit status is a failure; stderr's tail goes into the error. The command is killed (with
anything it started) at its timeout or at the request's deadline, whichever comes first.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from backends.base import MIN_CALL_S, Backend, BackendError, DeadlineExceeded, Generation, Health, ModelInfo, Request

STDERR_TAIL = 500
HEALTH_REQUEST = {"messages": [{"role": "user", "content": "Say OK."}], "schema": None, "max_tokens": 2,
                  "temperature": 0.0, "top_p": 1.0}


def _resolve(command: list[str], cwd: str | None, label: str) -> list[str]:
    """Fail at start, naming the setting, when the program cannot be found."""
    program = command[0]
    if os.sep in program:
        path = Path(cwd or ".").expanduser() / program
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendError(f"backend {label}: command {program!r} is not an executable file (from "
                               f"{Path(cwd or '.').resolve()}); fix backends command/cwd, or chmod +x it")
        return command
    if shutil.which(program) is None:
        raise BackendError(f"backend {label}: command {program!r} is not on PATH; give its full path in "
                           f"backends command")
    return command


class CustomCommandBackend(Backend):
    type = "custom"

    def __init__(self, name: str, command: list[str], cwd: str | None, timeout_s: float):
        super().__init__(name)
        self.command = command
        self.cwd = str(Path(cwd).expanduser()) if cwd else None
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Any) -> CustomCommandBackend:
        return cls(settings.label, _resolve(settings.command, settings.cwd, settings.label), settings.cwd,
                   settings.timeout_s)

    def info(self) -> ModelInfo:
        return ModelInfo(mode="custom", name=self.name, provider="custom")

    def _run(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        # A session of its own, so a timeout kills the command and whatever it started.
        try:
            proc = subprocess.Popen(self.command, cwd=self.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise BackendError(f"{self.name}: cannot run {self.command[0]}: {e}") from None
        try:
            out, err = proc.communicate(json.dumps(payload, ensure_ascii=False).encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeadlineExceeded(f"{self.name}: the command did not answer within {timeout:.1f} s "
                                   f"(backends timeout_s or the request deadline)") from None
        if proc.returncode != 0:
            tail = err.decode("utf-8", errors="replace")[-STDERR_TAIL:].strip()
            raise BackendError(f"{self.name}: the command exited with status {proc.returncode}: "
                               f"{tail or '(no stderr)'}")
        try:
            answer = json.loads(out)
        except json.JSONDecodeError as e:
            raise BackendError(f"{self.name}: the command's stdout is not JSON ({e}); it must print "
                               f'{{"text": ...}}, and send logs to stderr') from None
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise BackendError(f'{self.name}: the command must print a JSON object with a "text" string; got '
                               f"{out[:80]!r}")
        if not answer["text"].strip():
            raise BackendError(f"{self.name}: the command answered with empty text")
        return answer

    def generate(self, request: Request) -> Generation:
        started = time.monotonic()
        timeout = min(self.timeout_s, request.seconds_left())
        if timeout < MIN_CALL_S:
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the command could start")
        payload = {"messages": request.messages, "schema": request.schema, "max_tokens": request.max_tokens,
                   "temperature": request.temperature, "top_p": request.top_p, "seconds_left": round(timeout, 3)}
        answer = self._run(payload, timeout)
        model = self.info()
        if isinstance(answer.get("model"), str) and answer["model"]:
            model = ModelInfo(model.mode, answer["model"], model.provider)
        return Generation(text=answer["text"], prompt_tokens=int(answer.get("prompt_tokens") or 0),
                          completion_tokens=int(answer.get("completion_tokens") or 0),
                          seconds=time.monotonic() - started, backend=self.name, model=model)

    def health(self) -> Health:
        """Run the command on a tiny request: the only honest check of a program we know nothing about."""
        try:
            answer = self._run({**HEALTH_REQUEST, "seconds_left": self.timeout_s}, self.timeout_s)
        except BackendError as e:
            return Health(False, str(e))
        return Health(True, f"{Path(self.command[0]).name} answered a tiny request ({len(answer['text'])} characters)")
