"""StoryNet (subnet 92) miner: story JSON from local GGUF models in llama.cpp, with API fallbacks."""
__version__ = "0.1.0"
PROTOCOL_VERSION = "3.2.1"  # StorynetAI/storynet-subnet; 3.2.0 requests are still served
