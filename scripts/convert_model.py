#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint to a quantized GGUF file with llama.cpp's own converter.

    scripts/convert_model.py SOURCE [--quant Q4_K_M|Q4_0|Q8_0|none] [--outtype f16|bf16|f32] [--out FILE] [--json]

SOURCE is a checkpoint directory (safetensors or torch .bin) or a Hugging Face repo id. The converter is
llama.cpp's convert_hf_to_gguf.py from the sdist of the installed llama-cpp-python, downloaded once into
--cache. The path of the file written goes to stdout (a JSON object with --json); progress and errors go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.hf_to_gguf import OUTTYPES, QUANTS, ConversionError, convert  # noqa: E402
from models.llama_cpp_source import default_cache  # noqa: E402

log = logging.getLogger("convert_model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source",
                        help="checkpoint directory, or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--quant", choices=list(QUANTS), default="Q4_K_M",
                        help="llama.cpp quantization of the final file; 'none' keeps --outtype (default: %(default)s)")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                        help="precision of the unquantized GGUF written first (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output file (default: ./NAME-QUANT.gguf)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="folder that keeps llama.cpp's converter, per llama-cpp-python version "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object describing the file instead of its path")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the converter's whole log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert(args.source, quant=args.quant, outtype=args.outtype, out=args.out, cache=args.cache)
    except ConversionError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        fields = {"path": str(result.path), "arch": result.arch, "outtype": result.outtype,
                  "quant": result.quant, "bytes": result.size_bytes}
        print(json.dumps(fields))
    else:
        print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
