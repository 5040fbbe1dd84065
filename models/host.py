"""What this host gives a model whose weights stay in system RAM: how many threads decode, how much RAM there
is, and how fast it is read. Decode with weights in RAM reads each of them once per token, so the read rate
bounds it; the rate is measured (a few reads of 256 MiB with the decode's threads, well under a second)
rather than taken from a table, because rented hosts range from dual-channel desktops to 12-channel servers.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

READ_BYTES = 256 << 20
READS = 3  # the best of these: the first also pays for page faults


def default_threads() -> int:
    """llama.cpp's usual default (half the CPUs) leaves one of a small machine's two cores idle."""
    cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else cpus // 2


def ram_bytes() -> tuple[int, int]:
    """(total, available) system RAM: available as the kernel counts it (free plus reclaimable cache)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return total, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return total, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def read_bandwidth(threads: int | None = None) -> float:
    """Bytes a second this host reads from RAM with `threads` threads (default: the decode's), each reading
    its own share. numpy's reductions release the GIL, so the threads read at once, as llama.cpp's do."""
    threads = threads or default_threads()
    data = np.ones(READ_BYTES // 8, dtype=np.uint64)
    shares = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(READS):
            started = time.perf_counter()
            list(pool.map(np.bitwise_xor.reduce, shares))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best
