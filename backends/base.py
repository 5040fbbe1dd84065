"""The one small interface every way of generating text sits behind.

A backend knows nothing of synapses or tasks: it turns chat messages (plus an optional JSON schema)
into text, says whether it can serve, and says what it is. Each backend module holds all of one type:
its settings (a `BackendSettings` subclass: one `backends:` entry of the YAML), its type and mode, and
its health check; backends/__init__.py lists the modules.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from backends.errors import AnswerRejected, BackendBusy, BackendError, DeadlineExceeded

__all__ = ["AnswerRejected", "Backend", "BackendBusy", "BackendError", "BackendSettings", "DeadlineExceeded", "Dry",
           "Generation", "Health", "ModelInfo", "Request"]


@dataclass(frozen=True)
class Dry:
    """llama.cpp's DRY sampler ("don't repeat yourself"): a token that would extend a sequence already in the
    answer past `allowed_length` tokens is made less likely by multiplier x base^(length - allowed_length).
    A multiplier of 0 turns it off. Local sampling only."""
    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2
    last_n: int = 1024  # tokens of the answer it looks back over; -1: the whole context


@dataclass(frozen=True)
class Request:
    messages: list[dict[str, str]]
    max_tokens: int
    deadline: float  # time.monotonic() by which the answer must be back: the hard limit
    schema: dict[str, Any] | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    repeat_penalty: float = 1.1  # local sampling only; 1.0 is off; punctuation and line breaks exempt
    dry: Dry | None = None  # local sampling only; None: off
    # Sizing (backends that know their own speed): the time the answer should be back by, which sizes it
    # but never aborts it; the messages that ask for a schema shrunk to fit; text in the answer's language.
    target: float | None = None  # time.monotonic(); None: the deadline
    resize: Callable[[dict[str, Any]], list[dict[str, str]]] | None = field(default=None, compare=False)
    language_sample: str = ""
    prefix: str = ""  # the answer's start, fixed: the backend continues it (a targeted retry), or starts over
    priority: float = 0.0  # the caller's stake: more is served first when requests wait
    # Set when the caller has gone away: a backend that can stops the answer and frees what it holds.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def target_time(self) -> float:
        return self.deadline if self.target is None else min(self.target, self.deadline)


@dataclass(frozen=True)
class ModelInfo:
    mode: str  # "local", "api" or "custom": validators read it, so it must be honest
    name: str
    provider: str
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "name": self.name,
            "version": self.version,
            "provider": self.provider,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    backend: str
    model: ModelInfo
    finish_reason: str = "stop"  # "stop" or "length"
    schema: dict[str, Any] | None = None  # the schema the answer was held to, when the backend sized it
    cached_tokens: int = 0  # prompt tokens whose KV cache an earlier request had already computed
    forced_tokens: int = 0  # completion tokens the schema dictated, evaluated in batches
    first_token_s: float | None = None  # from the request's arrival at the backend, where it measures it


@dataclass(frozen=True)
class Health:
    ok: bool  # can serve now
    detail: str
    degraded: bool = False  # serves, but something the operator should fix is wrong (the detail says what)


class BackendSettings(BaseModel):
    """One `backends:` entry. A subclass adds `type: Literal["<its type>"]` and its own fields, each with
    bounds and a description: a wrong value fails at start naming the key."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="Label used in logs and health output; defaults to the type.")

    @property
    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Gauges:
    """What a backend is doing now, for /metrics."""
    running: int  # answers being generated
    waiting: int  # requests queued for a slot
    decode_tok_s: dict[int, float]  # learned tokens a second by sequences decoding together
    last_step_age_s: float | None = None  # since the engine last finished a step (None: none yet)
    restarts: int | None = None  # engine processes restarted since the miner started (None: not supervised)
    gpu_memory: tuple[int, int] | None = None  # (used, total) bytes of the GPU the engine runs on
    prefill_tok_s: float | None = None  # learned prompt speed


class Backend(ABC):
    """One way to generate text. Subclasses set `type` (the YAML `type:` value), `mode` (what validators
    are told: "local", "api" or "custom") and `Settings`."""

    type: ClassVar[str]
    mode: ClassVar[str]
    Settings: ClassVar[type[BackendSettings]]

    def __init__(self, name: str):
        self.name = name

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Any) -> Backend:
        """Build from one validated `backends:` entry of the YAML (an instance of cls.Settings)."""

    @abstractmethod
    def generate(self, request: Request) -> Generation:
        """Blocking: callers run it off the event loop. Raises BackendError, never returns filler."""

    @abstractmethod
    def health(self) -> Health:
        """A cheap, real check that this backend can serve now, its own settings' problems included."""

    @abstractmethod
    def info(self) -> ModelInfo:
        """What validators are told about the model behind this backend."""

    def gauges(self) -> Gauges | None:
        """What it is doing now; None where it cannot say (an API serves elsewhere)."""
        return None

    def close(self) -> None:
        """Release what the backend holds (model memory, connections)."""
