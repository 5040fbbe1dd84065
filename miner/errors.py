"""Every error the miner raises on purpose, in one tree (as huggingface_hub keeps its own): each message
says what failed and what to do about it. Code catches these by their place in the tree; any other
exception is a bug and keeps its traceback. Each class lives in the lowest package that raises it, so
models/ and backends/ need nothing of the miner; this module holds the miner's own and names them all.

    MinerError                     models/errors.py: the root
    ├── ConfigError                  the YAML or a flag cannot be used: names the file, key and fix
    ├── ModelError                   a model file cannot be had or made
    │   ├── UnknownModelError            not in the catalog
    │   ├── UnloadableModelError         a GGUF layout or architecture this llama.cpp cannot load
    │   ├── EmbeddedModelMissing         the demo model's package is not installed
    │   ├── DownloadError                (GatedRepoAccessError, NotEnoughDiskError, ChecksumMismatchError,
    │   │                                 DownloadInterruptedError)
    │   ├── ConversionError              a Hugging Face checkpoint could not be converted
    │   ├── QuantizeError                llama.cpp could not quantize
    │   └── SourceError                  llama.cpp's sources (the sdist) could not be had
    ├── AnswerRejected             backends/errors.py: an answer breaks the contract (which rule)
    │   └── ContractError          here: the task checks' word for it
    ├── BackendError               backends/errors.py: a backend could not answer: why, and the fix
    │   ├── BackendBusy              not now, at this load: the next backend answers, no cool-down
    │   │   └── DoesNotFit           too big for the backend's KV cache at any load
    │   ├── DeadlineExceeded         the request's time ran out
    │   └── AllBackendsFailed        every backend in the chain, each with its reason
    ├── LlamaError                 backends/errors.py: llama.cpp refused (a model, a context, a decode)
    │   └── NoKvRoom                 no free KV cells for a batch
    ├── StartupError               here: the miner cannot start (wallet, port, chain): says what to fix
    └── TaskInputError             here: a request's fields cannot be used: answered as an error
"""
from __future__ import annotations

from backends.errors import (AllBackendsFailed, AnswerRejected, BackendBusy, BackendError, DeadlineExceeded,
                             DoesNotFit, LlamaError, NoKvRoom)
from models.errors import (ChecksumMismatchError, ConfigError, ConversionError, DownloadError,
                           DownloadInterruptedError, EmbeddedModelMissing, GatedRepoAccessError, MinerError,
                           ModelError, NotEnoughDiskError, QuantizeError, SourceError, UnknownModelError,
                           UnloadableModelError)

__all__ = ["AllBackendsFailed", "AnswerRejected", "BackendBusy", "BackendError", "ChecksumMismatchError",
           "ConfigError", "ContractError", "ConversionError", "DeadlineExceeded", "DoesNotFit", "DownloadError",
           "DownloadInterruptedError", "EmbeddedModelMissing", "GatedRepoAccessError", "LlamaError", "MinerError",
           "ModelError", "NoKvRoom", "NotEnoughDiskError", "QuantizeError", "SourceError", "StartupError",
           "TaskInputError", "UnknownModelError", "UnloadableModelError"]


class StartupError(MinerError):
    """The miner cannot start; the message says what to fix."""


class TaskInputError(MinerError):
    """A request's fields cannot be used; the message says which and why."""


class ContractError(AnswerRejected):
    """An answer that breaks the protocol's contract; the message lists every rule it breaks."""
