"""Shared fixtures: the embedded model in llama.cpp, throwaway wallets, a loopback-only bittensor."""
from __future__ import annotations

import sys
import textwrap

import miner  # noqa: F401  (first: it loads llama_cpp before numpy and torch)

import pytest

from backends.custom_command import CustomSettings
from backends.llama_cpp import LlamaCppSettings
from miner import examples


@pytest.fixture(scope="session")
def embedded_backend():
    """The embedded demo model, loaded once for the whole run (a real llama.cpp model, 98 MB)."""
    from backends.llama_cpp import LlamaCppBackend
    # A seed: the same answers run after run (what a 135M model writes decides whether some tests pass).
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="local", n_ctx=8192, seed=1))
    yield backend
    backend.close()


@pytest.fixture
def writer(tmp_path) -> CustomSettings:
    """A custom command that writes the example blueprint, meeting the contract: a fallback backend."""
    path = tmp_path / "writer.py"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, sys
        json.load(sys.stdin)
        print(json.dumps({{"text": json.dumps({examples.BLUEPRINT!r}), "model": "fixture-writer"}}))
    """))
    path.chmod(0o755)
    return CustomSettings(type="custom", name="writer", command=[str(path)])
