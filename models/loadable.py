"""Whether the pinned llama.cpp can load a GGUF file, judged from its header alone: checked before a download
fetches gigabytes (models/download.py) and before a load or a plan (models/catalog.load_profile, which the
llama_cpp backend and `fit` read first), so that both say the same line instead of llama.cpp's
"missing tensor 'blk.0.ffn_down_exps.weight'" or a guess that the file is corrupt.
"""
from __future__ import annotations

import importlib.metadata
import re

from gguf.constants import MODEL_ARCH_NAMES

from models.gguf_header import Header

# llama-cpp-python does not expose llama.cpp's own table of architectures (src/llama-arch.cpp); gguf-py's is
# the same table from the same repository. gguf 0.19.0 (requirements.txt) names 126, all known to the llama.cpp
# in llama-cpp-python 0.3.36; that llama.cpp knows 28 newer ones besides, which this check refuses (none is in
# the catalog). tests/test_gguf_loadable.py checks the first half against the sdist's llama-arch.cpp.
KNOWN_ARCHITECTURES = frozenset(MODEL_ARCH_NAMES.values())
GGUF_VERSION = importlib.metadata.version("gguf")

# Mixtral files converted before April 2024 (TheBloke's, Dec 2023) hold one tensor per expert; llama.cpp
# merged them into blk.N.ffn_*_exps and in Nov 2024 stopped reading the old names (llama.cpp issue 10244).
_EXPERT_PER_TENSOR = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")


def why_unloadable(header: Header, file: str) -> str | None:
    """None when the pinned llama.cpp can load a file with this header, else one line: the file, why, and a
    file that works. `file` names it in the line (a path, or repo/filename on the hub)."""
    arch = header.metadata.get("general.architecture")
    if arch not in KNOWN_ARCHITECTURES:
        return (f"{file}: its architecture {arch!r} (general.architecture) is not one llama.cpp knows (gguf "
                f"{GGUF_VERSION}'s list); use a GGUF of a supported model, e.g. `storynet-miner download "
                "llama-3.1-8b` (all: `storynet-miner download --list`)")
    split = next((t.name for t in header.tensors if _EXPERT_PER_TENSOR.fullmatch(t.name)), None)
    if split:
        return (f"{file}: its MoE experts are stored one tensor each ({split}), a layout llama.cpp dropped in "
                "2024; this llama.cpp cannot load it: use a file converted since, e.g. "
                "mradermacher/Mixtral-8x7B-Instruct-v0.1-GGUF (`storynet-miner download mixtral-8x7b`)")
    return None
