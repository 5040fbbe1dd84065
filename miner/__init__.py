"""StoryFi (subnet 92) miner: story JSON from local GGUF models in llama.cpp, with API fallbacks."""
__version__ = "0.1.0"
