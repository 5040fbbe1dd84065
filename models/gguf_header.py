"""A GGUF file's header: its key-value metadata and its tensors' names, types and sizes, read with struct.

Why not gguf-py's GGUFReader: it makes one numpy view per string of the vocabulary, about 4 s for the demo
model's 100k strings on 2 cores and 20 s for Llama-3's 400k, before every model load (the engine's restart
included); this reads the same header in well under a second. Tensor sizes come from gguf-py's own
table of block sizes. The file is mapped, not read: only the header's pages are touched.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types: struct formats of the numeric ones, and the two that nest.
NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # as GGUF stores it: the fastest-varying dimension first
    type: int  # a GGMLQuantizationType
    n_bytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: tuple[Tensor, ...]


class NeedMoreBytes(Exception):
    """The buffer ends inside the header: the file is not damaged, only more of it must be read."""


def read_header(path: Path) -> Header:
    """ValueError when the file is not GGUF or its header is cut short."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return parse_header(data, str(path))
        except NeedMoreBytes:
            raise ValueError(f"{path}: the file ends inside its GGUF header (cut short)") from None


def parse_header(data: bytes | mmap.mmap, name: str) -> Header:
    """The header at the start of `data` (a whole file or its first bytes); `name` labels errors.
    NeedMoreBytes when data ends inside the header; ValueError when it is not GGUF or is damaged."""
    if len(data) >= 4 and data[:4] != b"GGUF":
        raise ValueError(f"{name} is not a GGUF file (it starts {data[:4]!r})")
    try:
        return _parse(data)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:  # ValueError: an unknown tensor type
        raise ValueError(f"{name}: the GGUF header is damaged ({type(e).__name__}: {e})") from None


def _parse(data: bytes | mmap.mmap) -> Header:
    pos = 4

    def claim(size: int) -> int:
        """Where the next `size` bytes start; a short buffer is not damage, so say so before struct does."""
        nonlocal pos
        if pos + size > len(data):
            raise NeedMoreBytes
        pos += size
        return pos - size

    def take(fmt: str) -> tuple[Any, ...]:
        return struct.unpack_from("<" + fmt, data, claim(struct.calcsize("<" + fmt)))

    def value(kind: int) -> Any:
        if kind == STRING:
            (size,) = take("Q")
            start = claim(size)
            return data[start:start + size].decode("utf-8")
        if kind == ARRAY:
            item, count = take("IQ")
            if item in NUMBERS:
                return list(take(f"{count}{NUMBERS[item]}"))
            return [value(item) for _ in range(count)]
        return take(NUMBERS[kind])[0]

    _version, n_tensors, n_kv = take("IQQ")
    metadata = {}
    for _ in range(n_kv):
        key = value(STRING)
        metadata[key] = value(take("I")[0])
    tensors = []
    for _ in range(n_tensors):
        name = value(STRING)
        (n_dims,) = take("I")
        shape = take(f"{n_dims}Q")
        kind, _offset = take("IQ")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        tensors.append(Tensor(name, tuple(shape), kind, prod(shape) // block * size))
    return Header(metadata, tuple(tensors))
