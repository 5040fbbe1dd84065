"""Quantizing a GGUF file with llama.cpp's own quantizer (`llama_model_quantize`)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from models.errors import QuantizeError

FTYPES = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
          "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def quantize(src: Path, dest: Path, quant: str, threads: int = 0) -> None:
    """Write src (an F16/BF16/F32 GGUF) quantized to dest; threads 0: llama.cpp's default (every core)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if status != 0:
        raise QuantizeError(f"llama.cpp could not quantize {src} to {quant} (status {status}); "
                            "its log above says which tensor")
