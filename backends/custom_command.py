"""A program the operator names: the request goes in as JSON on stdin, the answer comes out as JSON on
stdout. It lets a miner plug in anything (another runtime, a wrapper around an in-house service)
without touching this code.

stdin:  {"messages": [{"role": ..., "content": ...}], "schema": {...} or null, "max_tokens": int,
         "temperature": float, "top_p": float, "seconds_left": float}
stdout: {"text": "<the model's answer, e.g. the JSON object as a string>",
         "model": "<optional model name>", "prompt_tokens": int, "completion_tokens": int}
A non-zero exit status is a failure; stderr's tail goes into the error. The command is killed (with
anything it started) at its timeout or at the request's deadline, whichever comes first; one that timed
out is run again while max_retries and the deadline allow.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from backends.base import BackendError, Health, ModelInfo, Request
from backends.remote import Failure, RemoteBackend, RemoteSettings, Reply

STDERR_TAIL = 500
HEALTH_REQUEST = {"messages": [{"role": "user", "content": "Say OK."}], "schema": None, "max_tokens": 2,
                  "temperature": 0.0, "top_p": 1.0}


class CustomSettings(RemoteSettings):
    type: Literal["custom"]
    command: list[str] = Field(..., min_length=1, description="Argv of a program: request JSON on stdin, answer JSON on stdout.")
    cwd: str | None = Field(None, description="Working directory for the command.")
    timeout_s: float = Field(25.0, gt=0, le=120, description="Kill the command after this long (and at the deadline).")
    max_retries: int = Field(0, ge=0, le=5, description="Runs again of a command that timed out, while the deadline allows.")


class CommandTimedOut(Exception):
    pass


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


class CustomCommandBackend(RemoteBackend):
    type = "custom"
    mode = "custom"
    Settings = CustomSettings
    provider = "custom"

    def __init__(self, settings: CustomSettings):
        super().__init__(settings)
        self.command = _resolve(settings.command, settings.cwd, settings.label)
        self.cwd = str(Path(settings.cwd).expanduser()) if settings.cwd else None
        self.where = Path(self.command[0]).name

    @classmethod
    def from_settings(cls, settings: CustomSettings) -> CustomCommandBackend:
        return cls(settings)

    def info(self) -> ModelInfo:
        return ModelInfo(mode=self.mode, name=self.name, provider=self.provider)

    def served(self, model: str | None) -> ModelInfo:
        """The command may name its model: it is the model's name, there being no other."""
        return ModelInfo(self.mode, model, self.provider) if model else self.info()

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
            raise CommandTimedOut(f"the command did not answer within {timeout:.1f} s (backends timeout_s or "
                                  f"the request deadline)") from None
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
        return answer

    def call(self, request: Request, timeout: float) -> dict[str, Any]:
        payload = {"messages": request.messages, "schema": request.schema, "max_tokens": request.max_tokens,
                   "temperature": request.temperature, "top_p": request.top_p, "seconds_left": round(timeout, 3)}
        return self._run(payload, timeout)

    def classify(self, error: Exception) -> Failure | None:
        return Failure(str(error), transient=True) if isinstance(error, CommandTimedOut) else None

    def parse(self, response: dict[str, Any]) -> Reply:
        model = response.get("model")
        return Reply(text=response["text"], prompt_tokens=int(response.get("prompt_tokens") or 0),
                     completion_tokens=int(response.get("completion_tokens") or 0),
                     served_by=model if isinstance(model, str) and model else None)

    def health(self) -> Health:
        """Run the command on a tiny request: the only honest check of a program we know nothing about."""
        try:
            answer = self._run({**HEALTH_REQUEST, "seconds_left": self.timeout_s}, self.timeout_s)
        except (BackendError, CommandTimedOut) as e:
            return Health(False, f"{self.name}: {e}" if isinstance(e, CommandTimedOut) else str(e))
        if not answer["text"].strip():
            return Health(False, f"{self.name}: the command answered a tiny request with empty text")
        return Health(True, f"{self.where} answered a tiny request ({len(answer['text'])} characters)")
