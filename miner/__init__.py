"""StoryNet (subnet 92) miner: story JSON from local GGUF models in llama.cpp, with API fallbacks."""
import contextlib

# llama_cpp loads before numpy, once for the whole program: the other order made CUDA model loading
# segfault (docs/measurements.md). The packages backends and models import this one first.
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401

__version__ = "0.1.0"
PROTOCOL_VERSION = "3.2.1"  # StorynetAI/storynet-subnet; 3.2.0 requests are still served
PROTOCOLS = (PROTOCOL_VERSION, "3.2.0")  # the versions this miner speaks
