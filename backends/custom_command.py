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
The command does not inherit the miner's environment, where its API keys are: it gets the basics (PATH,
HOME, locale, time zone, temp dir) and the variables `pass_env` names.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from backends.base import BackendError, DeadlineExceeded, Health, ModelInfo, Request
from backends.remote import Failure, RemoteBackend, RemoteSettings, Reply, api_schema, redact, register_secret

STDERR_TAIL = 500
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")  # and every LC_*
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HEALTH_REQUEST = {"messages": [{"role": "user", "content": "Say OK."}], "schema": None, "max_tokens": 2,
                  "temperature": 0.0, "top_p": 1.0}


class CustomSettings(RemoteSettings):
    type: Literal["custom"]
    command: list[str] = Field(..., min_length=1, description="Argv of a program: request JSON on stdin, answer JSON on stdout.")
    cwd: str | None = Field(None, description="Working directory for the command.")
    timeout_s: float = Field(25.0, gt=0, le=120, description="Kill the command after this long (and at the deadline).")
    max_retries: int = Field(0, ge=0, le=5, description="Runs again of a command that timed out, while the deadline allows.")
    pass_env: list[str] = Field(
        default_factory=list, description="Names of the miner's environment variables the command also gets "
        "(e.g. the key of a service it calls); it always gets PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, LC_*, "
        "TZ and TMPDIR, and nothing else: the miner's API keys stay with the miner.")

    @field_validator("pass_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        bad = [name for name in names if not ENV_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        return names


def _environment(pass_env: list[str], label: str) -> dict[str, str]:
    """The command's whole environment; a variable pass_env names must be set (else it is a typo, or a
    forgotten export). Its values are kept out of error texts, as API keys are."""
    env = {k: v for k, v in os.environ.items() if k in BASE_ENV or k.startswith("LC_")}
    for name in pass_env:
        if name not in os.environ:
            raise BackendError(f"environment variable {name} (pass_env of backend {label}) is not set; export "
                               f"it, or remove it from backends pass_env")
        env[name] = os.environ[name]
        register_secret(os.environ[name], name)
    return env


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
        self.env = _environment(settings.pass_env, settings.label)

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
            proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise BackendError(f"{self.name}: cannot run {self.command[0]}: {e}") from None
        try:
            out, err = proc.communicate(json.dumps(payload, ensure_ascii=False).encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeadlineExceeded(f"the command did not answer within {timeout:.1f} s (backends timeout_s or the "
                                   f"request deadline)") from None
        if proc.returncode != 0:
            tail = redact(err.decode("utf-8", errors="replace"))[-STDERR_TAIL:].strip()
            raise BackendError(f"{self.name}: the command exited with status {proc.returncode}: "
                               f"{tail or '(no stderr)'}")
        try:
            answer = json.loads(out)
        except json.JSONDecodeError as e:
            raise BackendError(f"{self.name}: the command's stdout is not JSON ({e}); it must print "
                               f'{{"text": ...}}, and send logs to stderr') from None
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise BackendError(f'{self.name}: the command must print a JSON object with a "text" string; got '
                               f"{redact(out.decode('utf-8', errors='replace'))[:80]!r}")
        return answer

    def call(self, request: Request, timeout: float) -> dict[str, Any]:
        payload = {"messages": request.messages, "schema": api_schema(request.schema), "max_tokens": request.max_tokens,
                   "temperature": request.temperature, "top_p": request.top_p, "seconds_left": round(timeout, 3)}
        return self._run(payload, timeout)

    def classify(self, error: Exception) -> Failure | None:
        return Failure(str(error), transient=True) if isinstance(error, DeadlineExceeded) else None

    def parse(self, response: dict[str, Any]) -> Reply:
        model = response.get("model")
        return Reply(text=response["text"], prompt_tokens=int(response.get("prompt_tokens") or 0),
                     completion_tokens=int(response.get("completion_tokens") or 0),
                     served_by=model if isinstance(model, str) and model else None)

    def health(self) -> Health:
        """Run the command on a tiny request: the only honest check of a program we know nothing about."""
        try:
            answer = self._run({**HEALTH_REQUEST, "seconds_left": self.timeout_s}, self.timeout_s)
        except DeadlineExceeded as e:
            return Health(False, f"{self.name}: {e}")
        except BackendError as e:
            return Health(False, str(e))
        if not answer["text"].strip():
            return Health(False, f"{self.name}: the command answered a tiny request with empty text")
        return Health(True, f"{self.where} answered a tiny request ({len(answer['text'])} characters)")
