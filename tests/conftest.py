"""Shared fixtures: the embedded model in llama.cpp, throwaway wallets, a loopback-only bittensor."""
from __future__ import annotations

import contextlib

# llama_cpp before numpy/torch: the other order made CUDA model loading segfault (docs/measurements.md).
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401

import pytest

from backends.llama_cpp import LlamaCppSettings


@pytest.fixture(scope="session")
def embedded_backend():
    """The embedded demo model, loaded once for the whole run (a real llama.cpp model, 98 MB)."""
    from backends.llama_cpp import LlamaCppBackend
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="local", n_ctx=8192))
    yield backend
    backend.close()
