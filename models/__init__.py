"""Models the miner runs: the catalog, downloads, conversion, VRAM planning, the embedded demo model."""
