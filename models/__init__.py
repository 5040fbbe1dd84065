"""Models the miner runs: the catalog, downloads, conversion, VRAM planning, the embedded demo model."""
import miner  # noqa: F401  (first: it loads llama_cpp before anything loads numpy)
