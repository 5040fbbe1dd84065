"""The errors of the backends: what a backend, the engine, llama.cpp and the fallback chain raise, under
the root of the miner's error tree (models/errors.py; miner/errors.py draws the whole tree)."""
from __future__ import annotations

from models.errors import MinerError


class AnswerRejected(MinerError):
    """The caller refused an answer. `retry_from` is the start of it worth keeping: one more try continues
    from there (where the backend can), so only the failing part is written again."""

    def __init__(self, message: str, retry_from: str | None = None):
        super().__init__(message)
        self.retry_from = retry_from


class BackendError(MinerError):
    """A backend could not produce an answer; the message says why and, where it can, the fix."""


class BackendBusy(BackendError):
    """The backend cannot answer this request in time at its current load: not a failure."""


class DoesNotFit(BackendBusy):
    """The request is too big for this backend's KV cache at any load: the next backend answers."""


class DeadlineExceeded(BackendError):
    """The request's deadline passed before the backend finished."""


class AllBackendsFailed(BackendError):
    """No backend in the chain could answer; the message gives each one's reason."""

    def __init__(self, reasons: list[tuple[str, str]], busy: bool = False):
        self.reasons = reasons
        self.busy = busy  # the backends that were asked all refused as busy: overload, not a fault
        super().__init__("no backend could answer: " + "; ".join(f"{n}: {r}" for n, r in reasons))


class LlamaError(MinerError):
    """llama.cpp refused: a model or context that could not be made, or a failed decode."""


class NoKvRoom(LlamaError):
    """llama_decode found no free KV cells for the batch (return code 1)."""
