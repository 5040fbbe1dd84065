"""What every backend that calls out (an API, a program) shares: tries inside the request's deadline,
retries of transient failures, the error texts, the key from the environment (kept out of every error
text, see `redact`), and model_info naming the model that really served. A provider supplies three
hooks: `call` makes one try, `classify` says what a failure means, `parse` reads the answer; and its own
`health`.
"""
from __future__ import annotations

import os
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from backends.base import (Backend, BackendError, BackendSettings, DeadlineExceeded, Generation, ModelInfo,
                           Request)
from backends.constraint import ENDS_ON_SENTENCE
from backends.sizing import LEAST, UNSCORED

MIN_CALL_S = 1.0  # less time left than this: a call cannot finish, so none is started
LOCAL_KEYS = (UNSCORED, LEAST)  # the sizer's marks: nothing for a server
HEALTH_TIMEOUT_S = 10.0  # a health check's own call
RETRY_PAUSE_S = 0.5
# Shorter values are no real secret, and replacing them everywhere would garble texts.
MIN_SECRET_CHARS = 8

def api_schema(schema: Any) -> Any:
    """The task's schema as a server or a program gets it: plain JSON Schema, without the sizer's marks and
    without the sentence-end pattern, which is the local engine's to hold (llama.cpp's own JSON-schema grammar,
    behind llama-cpp-python's server, stalled on it; the contract does not ask for it)."""
    if isinstance(schema, list):
        return [api_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: api_schema(v) for k, v in schema.items()
            if k not in LOCAL_KEYS and not (k == "pattern" and v == ENDS_ON_SENTENCE)}


_secrets: tuple[tuple[str, str], ...] = ()  # (value, variable name) of every secret read so far
_secrets_lock = threading.Lock()


def register_secret(value: str, env_name: str) -> None:
    """Remember a secret read from the environment, so that `redact` keeps it out of every text."""
    global _secrets
    if len(value) < MIN_SECRET_CHARS:
        return
    with _secrets_lock:
        if all(v != value for v, _ in _secrets):
            _secrets = (*_secrets, (value, env_name))


def redact(text: str) -> str:
    """The text with every registered secret replaced by the variable's name: a server or program may
    echo a key back (a 401 body, stderr), and these texts reach logs, health reports and validators."""
    for value, env_name in _secrets:
        if value in text:
            text = text.replace(value, f"<{env_name}: redacted>")
    return text


class RemoteSettings(BackendSettings):
    timeout_s: float = Field(20.0, gt=0, le=120, description="Per-call timeout, capped by the request deadline.")
    max_retries: int = Field(1, ge=0, le=5, description="Retries of a call that timed out or met a transient "
                                                        "error (connection, 429, 5xx) while the deadline allows.")


class APISettings(RemoteSettings):
    model: str = Field(..., description="Model name as the server knows it.")
    base_url: str | None = Field(None, description="Another endpoint for the API (a proxy, a server of your own).")
    api_key_env: str | None = Field(None, description="Environment variable holding the key; null for none.")


def api_key(settings: APISettings, how: str) -> str | None:
    """The key from the environment variable the YAML names (never from the YAML itself); None when it
    names none. `how` tells the operator what to export."""
    if not settings.api_key_env:
        return None
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        raise BackendError(f"environment variable {settings.api_key_env} (api_key_env of backend {settings.label}) "
                           f"is not set; {how}")
    register_secret(key, settings.api_key_env)
    return key


@dataclass(frozen=True)
class Failure:
    """What a failed call means: its text for the operator, and whether another try may succeed."""
    text: str
    transient: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", redact(self.text))  # every provider's failure text passes here


@dataclass(frozen=True)
class Reply:
    """What `parse` reads off a provider's answer."""
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" or "length"
    served_by: str | None = None  # the model that really answered, when the provider says (a dated snapshot)


class Retries:
    """The tries of one call inside a request's deadline: each gets min(timeout_s, time left); transient
    failures are retried up to max_retries."""

    def __init__(self, name: str, request: Request, timeout_s: float, max_retries: int):
        self.name, self.request, self.timeout_s, self.max_retries = name, request, timeout_s, max_retries
        self.failures: list[str] = []

    def timeout(self) -> float:
        """Seconds for the next try; raises DeadlineExceeded when none can finish in time."""
        timeout = min(self.timeout_s, self.request.seconds_left())
        if timeout < MIN_CALL_S:
            after = f" after {len(self.failures)} failed tries: {self.failures[-1]}" if self.failures else ""
            raise DeadlineExceeded(f"{self.name}: the deadline passed{after}")
        return timeout

    def failed(self, reason: str) -> None:
        """A transient failure: raise once retries or time are spent, else pause briefly before the next try."""
        self.failures.append(reason)
        if self.request.seconds_left() < MIN_CALL_S:
            raise DeadlineExceeded(f"{self.name}: the deadline passed after {len(self.failures)} failed tries: "
                                   f"{reason}")
        if len(self.failures) > self.max_retries:
            raise BackendError(f"{self.name}: {reason} ({len(self.failures)} tries; backends max_retries "
                               f"is {self.max_retries})")
        time.sleep(min(RETRY_PAUSE_S, max(self.request.seconds_left() - MIN_CALL_S, 0)))


class RemoteBackend(Backend):
    provider: str  # model_info's provider
    where: str  # what it calls, for error texts: a URL, "the Gemini API", a program

    def __init__(self, settings: RemoteSettings):
        super().__init__(settings.label)
        self.timeout_s = settings.timeout_s
        self.max_retries = settings.max_retries

    @abstractmethod
    def call(self, request: Request, timeout: float) -> Any:
        """One try, given at most `timeout` seconds; raises what the provider raises."""

    @abstractmethod
    def classify(self, error: Exception) -> Failure | None:
        """What a failure of `call` (or of a health check) means; None: not the provider's, so a bug."""

    @abstractmethod
    def parse(self, response: Any) -> Reply:
        """The answer in a provider's response; raises BackendError when there is none."""

    def no_answer(self, error: Exception) -> Failure:
        return Failure(f"{self.where} did not answer ({type(error).__name__}: {error})", transient=True)

    def generate(self, request: Request) -> Generation:
        started = time.monotonic()
        retries = Retries(self.name, request, self.timeout_s, self.max_retries)
        while True:
            timeout = retries.timeout()
            try:
                response = self.call(request, timeout)
            except Exception as e:
                failure = self.classify(e)
                if failure is None:
                    raise
                if not failure.transient:
                    raise BackendError(f"{self.name}: {failure.text}") from None
                retries.failed(failure.text)
                continue
            reply = self.parse(response)
            if not reply.text.strip():
                raise BackendError(f"{self.name}: empty answer (finish reason {reply.finish_reason})")
            return Generation(text=reply.text, prompt_tokens=reply.prompt_tokens,
                              completion_tokens=reply.completion_tokens, seconds=time.monotonic() - started,
                              backend=self.name, model=self.served(reply.served_by),
                              finish_reason=reply.finish_reason)

    def served(self, model: str | None) -> ModelInfo:
        """model_info for an answer: this backend's, with the version the provider says it used."""
        info = self.info()
        if not model or model == info.name:
            return info
        return ModelInfo(info.mode, info.name, info.provider, model, info.parameters)
