import contextlib

# llama_cpp must load before numpy: the other order made CUDA model loading segfault (docs/measurements.md).
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401

from miner.cli import main

raise SystemExit(main())
