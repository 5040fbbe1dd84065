"""StoryNet (subnet 92) miner: story JSON from local GGUF models in llama.cpp, with API fallbacks."""
import models  # noqa: F401  (first: it loads llama_cpp before anything loads numpy)

__version__ = "0.1.0"
PROTOCOL_VERSION = "3.2.1"  # StorynetAI/storynet-subnet; 3.2.0 requests are still served
PROTOCOLS = (PROTOCOL_VERSION, "3.2.0")  # the versions this miner speaks
