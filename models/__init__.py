"""Models the miner runs: the catalog, downloads, conversion, VRAM planning, the embedded demo model.

llama_cpp loads here, before anything loads numpy (gguf-py, which this package reads files with, imports
it): the other order made CUDA model loading segfault (docs/measurements.md). This is the lowest of the
three packages, so backends/ and miner/ import it first and the order holds for every entry point.
"""
import contextlib
import os

with contextlib.suppress(ImportError):  # the CLI still says what is missing when llama_cpp is not installed
    import llama_cpp  # noqa: F401


def default_models_dir() -> str:
    """$XDG_DATA_HOME/storynet-miner/models, else ~/.local/share/storynet-miner/models: weights of many
    gigabytes live outside the code (this package holds the code that handles them)."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return os.path.join(data, "storynet-miner", "models")
