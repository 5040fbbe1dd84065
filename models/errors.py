"""The root of the miner's one error tree, and the errors of the models package. Every error the miner
raises on purpose is a MinerError: the CLI turns one into a single line and exit 2, and any other
exception is a bug that keeps its traceback. Each class lives in the lowest package that raises it
(models, then backends/errors.py, then miner/errors.py, which draws the whole tree). This module imports
nothing, so any module can import it."""
from __future__ import annotations


class MinerError(Exception):
    """Something the miner refuses or cannot do; the message names the file, key or setting and the fix."""


class ConfigError(MinerError):
    """The configuration or a flag cannot be used; the message names the file and key."""


class ModelError(MinerError):
    """A model file cannot be had or made; the message names the file or model and the next command."""


class UnknownModelError(ModelError):
    """A model name the catalog does not hold."""


class EmbeddedModelMissing(ModelError):
    """The package that carries the embedded demo model is not installed."""


class UnloadableModelError(ModelError):
    """A GGUF file the pinned llama.cpp cannot load (its layout or architecture), found from its header: by
    `download` before fetching it, and by `fit` and the llama_cpp backend before loading it."""


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
