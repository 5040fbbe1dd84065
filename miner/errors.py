"""Every error the miner raises on purpose, in one tree (as huggingface_hub keeps its own): each message
says what failed and what to do about it. Code catches these by their place in the tree; any other
exception is a bug and keeps its traceback. This module imports nothing, so every module can import it.

    MinerError
    ├── ConfigError           the YAML or a flag cannot be used: names the file, key and fix
    ├── StartupError          the miner cannot start (wallet, port, chain): says what to fix
    ├── TaskInputError        a request's fields cannot be used: answered to its validator as an error
    ├── AnswerRejected        an answer breaks the contract (ContractError: which rule)
    │   └── ContractError
    ├── BackendError          a backend could not answer: why, and where it can, the fix
    │   ├── BackendBusy       not now, at this load: the next backend answers, no cool-down
    │   │   └── DoesNotFit    too big for the backend's KV cache at any load
    │   ├── DeadlineExceeded  the request's time ran out
    │   └── AllBackendsFailed every backend in the chain, each with its reason
    ├── LlamaError            llama.cpp refused: a model or context that could not be made, a failed decode
    │   └── NoKvRoom          no free KV cells for a batch
    └── ModelError            a model file cannot be had or made
        ├── UnknownModelError     not in the catalog
        ├── EmbeddedModelMissing  the demo model's package is not installed
        ├── DownloadError         (GatedRepoAccessError, NotEnoughDiskError, ChecksumMismatchError,
        │                          DownloadInterruptedError)
        ├── ConversionError       a Hugging Face checkpoint could not be converted
        ├── QuantizeError         llama.cpp could not quantize
        └── SourceError           llama.cpp's sources (the sdist) could not be had
"""
from __future__ import annotations


class MinerError(Exception):
    """Something the miner refuses or cannot do; the message names the file, key or setting and the fix."""


class ConfigError(MinerError):
    """The configuration cannot be used; the message names the file and key."""


class StartupError(MinerError):
    """The miner cannot start; the message says what to fix."""


class TaskInputError(MinerError):
    """A request's fields cannot be used; the message says which and why."""


class AnswerRejected(MinerError):
    """The caller refused an answer. `retry_from` is the start of it worth keeping: one more try continues
    from there (where the backend can), so only the failing part is written again."""

    def __init__(self, message: str, retry_from: str | None = None):
        super().__init__(message)
        self.retry_from = retry_from


class ContractError(AnswerRejected):
    """An answer that breaks the protocol's contract; the message lists every rule it breaks."""


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


class ModelError(MinerError):
    """A model file cannot be had or made; the message names the file or model and the next command."""


class UnknownModelError(ModelError):
    """A model name the catalog does not hold."""


class EmbeddedModelMissing(ModelError):
    """The package that carries the embedded demo model is not installed."""


class DownloadError(ModelError):
    """A download failed; the message says why and what to run."""


class GatedRepoAccessError(DownloadError):
    """The repository needs a login and an accepted license."""


class NotEnoughDiskError(DownloadError):
    """Too little free space for the file."""


class ChecksumMismatchError(DownloadError):
    """The file's SHA-256 is not the hub's."""


class DownloadInterruptedError(DownloadError):
    """The connection dropped; the same command resumes."""


class ConversionError(ModelError):
    """A Hugging Face checkpoint could not be converted to GGUF."""


class QuantizeError(ModelError):
    """llama.cpp refused to quantize; its log says which tensor."""


class SourceError(ModelError):
    """llama.cpp's sources could not be had; the message says what to run."""
