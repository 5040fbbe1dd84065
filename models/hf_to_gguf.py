"""Convert a Hugging Face checkpoint to a quantized GGUF file with llama.cpp's own converter.

The converter (convert_hf_to_gguf.py, its conversion/ package and its gguf-py) comes from the sdist of
the installed llama-cpp-python (models/llama_cpp_source.py), so it follows every architecture that
llama.cpp supports and writes what the llama.cpp that loads the file expects. It picks a BPE
tokenizer's pre-tokenizer by hashing the tokenizer's output, and refuses one it does not recognise.
It runs in a subprocess to an f16 (bf16, f32) GGUF; llama.cpp's quantizer then writes the final file.

    storynet-miner convert SOURCE [--quant Q4_K_M|Q4_0|Q8_0|none] [--outtype f16|bf16|f32] [--out FILE] [--json]

SOURCE is a checkpoint directory (safetensors or torch .bin) or a Hugging Face repo id. The path of the
file written goes to stdout (a JSON object with --json); progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ConversionError, QuantizeError, SourceError
from models.llama_cpp_source import default_cache, installed_version, llama_cpp_tree
from models.quantize import quantize

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
# What the converter reads besides itself: its model classes, its gguf-py, chat templates some models get.
CONVERTER_FILES = (CONVERTER, "conversion", "gguf-py/gguf", "models/templates", "LICENSE")
OUTTYPES = {"f16": 2, "bf16": 2, "f32": 4}  # bytes a weight in the converter's output
QUANTS = {"Q4_K_M": 0.62, "Q4_0": 0.57, "Q8_0": 1.07, "none": 0.0}  # bytes a weight, to plan disk space
SOURCE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # config.json dtype -> bytes a stored weight
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")  # what the converter reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SPACE_MARGIN = 64 * 2**20
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    arch: str  # config.json model_type
    outtype: str
    quant: str
    size_bytes: int


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory with weights, a tokenizer and a config.json naming its architecture."""

    path: Path
    name: str
    config: dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]


def open_checkpoint(source: str) -> Checkpoint:
    model_dir = locate(source)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} is missing; SOURCE must be a Hugging Face checkpoint directory "
                              "(what save_pretrained() writes) or a repo id")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not config.get("architectures"):
        raise ConversionError(f"{config_path} names no architectures (such as LlamaForCausalLM); "
                              "save the model with save_pretrained() or take config.json from its repository")
    check_tokenizer(model_dir)
    if not weight_files(model_dir):
        raise ConversionError(f"{model_dir} holds no {' or '.join(WEIGHT_FILES)} weights; save the model with "
                              "save_pretrained() or download the full repository")
    return Checkpoint(model_dir, Path(source.rstrip("/")).name, config)


def check_tokenizer(model_dir: Path) -> None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(f"{model_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); the GGUF file needs "
                              "it: save it beside the weights with tokenizer.save_pretrained()")
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file() or (model_dir / "tokenizer.model").is_file():
        return
    model = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        # From tokenizer.json alone the converter scores every piece alike, and llama.cpp merges by score.
        raise ConversionError(f"{tokenizer_json} holds a SentencePiece tokenizer (BPE with byte fallback) but "
                              f"{model_dir} lacks its tokenizer.model; converted without it, llama.cpp would split "
                              "text differently from the model. Put the model's tokenizer.model beside it "
                              "(from the same repository)")


def weight_files(model_dir: Path) -> list[Path]:
    return next((files for pattern in WEIGHT_FILES if (files := sorted(model_dir.glob(pattern)))), [])


def locate(source: str) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded into the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not REPO_ID.fullmatch(source):
        raise ConversionError(f"{path} is not a checkpoint directory; pass a directory holding config.json and "
                              "the weights, or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct")
    return download(source)


def download(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HTTPError

    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        files = list_repo_files(repo_id)
        weights = WEIGHT_FILES[0] if any(f.endswith(".safetensors") for f in files) else WEIGHT_FILES[1]
        # What the converter reads: config, tokenizer (tokenizer.json, or vocab.json + merges.txt), template.
        patterns = [weights, "*.json", "*.txt", "tokenizer.model", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError, HTTPError) as exc:  # no network, unknown or gated repo, bad id
        raise ConversionError(f"could not download {repo_id!r} ({exc}); no local directory of that name exists "
                              "either. Check the repo id, run `hf auth login` for a gated model, "
                              "or pass a local checkpoint directory") from exc


def ensure_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if free < needed + SPACE_MARGIN:
        raise ConversionError(f"not enough free space for {dest}: about {needed / 2**30:.2f} GiB needed, "
                              f"{free / 2**30:.2f} GiB free in {dest.parent}; "
                              "free space or pass --out on a larger disk")


def space_needed(ckpt: Checkpoint, outtype: str, quant: str) -> int:
    """Bytes of the converter's file and the quantized one, which exist together for a while."""
    stored = sum(f.stat().st_size for f in weight_files(ckpt.path))
    dtype = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    n_weights = stored / SOURCE_BYTES.get(dtype, 2)
    return int(n_weights * (OUTTYPES[outtype] + QUANTS[quant]))


def converter_label() -> str:
    return f"llama-cpp-python {installed_version()}"


def unsupported_architecture(ckpt: Checkpoint, _: re.Match[str]) -> str:
    return (f"{ckpt.path / 'config.json'}: llama.cpp's converter in {converter_label()} does not support the "
            f"architecture {ckpt.architecture}. A newer llama-cpp-python may (the converter follows the "
            "installed version: upgrade it, then run again), or download a GGUF file someone else made")


def unknown_pre_tokenizer(ckpt: Checkpoint, _: re.Match[str]) -> str:
    return (f"{ckpt.path / 'tokenizer.json'}: llama.cpp's converter in {converter_label()} does not recognise this "
            "BPE tokenizer's pre-tokenizer, so llama.cpp would split text differently from the model's training; "
            "nothing was written. Use the tokenizer files from the model's own repository, or a newer "
            "llama-cpp-python whose converter knows this tokenizer")


def missing_package(ckpt: Checkpoint, match: re.Match[str]) -> str:
    return (f"llama.cpp's converter needs the Python package {match[1]!r}: "
            "run `.venv/bin/pip install -r requirements-convert.txt`")


# The converter's own messages, from its output, and the errors they become.
CONVERTER_FAILURES: tuple[tuple[re.Pattern[str], Callable[[Checkpoint, re.Match[str]], str]], ...] = (
    (re.compile(r"Model \S+ is not supported"), unsupported_architecture),
    (re.compile(r"BPE pre-tokenizer was not recognized"), unknown_pre_tokenizer),
    (re.compile(r"No module named '([\w.]+)'"), missing_package),
)


def run_converter(ckpt: Checkpoint, outtype: str, dest: Path, cache: Path | None) -> None:
    tree = llama_cpp_tree(CONVERTER_FILES, cache)
    # Its own gguf-py first: the version of the gguf package it was written with.
    python_path = os.pathsep.join(filter(None, [str(tree / "gguf-py"), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, str(tree / CONVERTER), str(ckpt.path), "--outtype", outtype, "--outfile", str(dest)]
    log.info("converting %s (%s) to %s with %s from %s", ckpt.path, ckpt.architecture, outtype, CONVERTER,
             converter_label())
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               encoding="utf-8", errors="replace", env=os.environ | {"PYTHONPATH": python_path})
    output = []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        # Its warnings are worth seeing (a token it ignored, a setting it does not know); the rest is progress.
        level, _, message = line.rstrip().partition(":")
        if level in ("WARNING", "ERROR"):
            log.warning("converter: %s", message)
        else:
            log.debug("%s", line.rstrip())
    if process.wait() == 0:
        return
    text = "".join(output)
    for pattern, explain in CONVERTER_FAILURES:
        if match := pattern.search(text):
            raise ConversionError(explain(ckpt, match))
    tail = "".join(output[-15:]).rstrip()
    raise ConversionError(f"llama.cpp's converter failed on {ckpt.path} (exit status {process.returncode}); "
                          f"its last lines:\n{tail}\nrun `storynet-miner convert` with -v for its whole log")


def convert(source: str | Path, *, quant: str = "Q4_K_M", outtype: str = "f16", out: str | Path | None = None,
            cache: Path | None = None) -> ConversionResult:
    """Convert SOURCE (checkpoint directory or repo id) to a GGUF file, quantized unless quant is 'none'.

    cache: where llama.cpp's converter is kept (models.llama_cpp_source.default_cache() if None).
    """
    for what, value, choices in (("quant", quant, QUANTS), ("outtype", outtype, OUTTYPES)):
        if value not in choices:
            raise ConversionError(f"--{what} {value!r} is not one of: {', '.join(choices)}")
    ckpt = open_checkpoint(str(source))
    label = outtype if quant == "none" else quant
    dest = Path(out) if out else Path.cwd() / f"{ckpt.name}-{label}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(dest, space_needed(ckpt, outtype, quant))
    # Half-written files keep a .part suffix so a failed run never leaves something that looks usable.
    part = dest.with_name(dest.name + ".part")
    plain = part if quant == "none" else dest.with_name(f"{dest.name}.{outtype}.part")
    try:
        try:
            run_converter(ckpt, outtype, plain, cache)
        except SourceError as exc:
            raise ConversionError(str(exc)) from None
        if quant != "none":
            log.info("quantizing to %s with llama.cpp", quant)
            try:
                quantize(plain, part, quant)
            except QuantizeError as exc:
                raise ConversionError(f"{exc}; try --quant Q8_0 or --quant none") from None
        part.replace(dest)
    finally:
        plain.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return ConversionResult(dest, ckpt.config.get("model_type", ckpt.architecture), outtype, quant,
                            dest.stat().st_size)


def arguments(parser: argparse.ArgumentParser) -> None:
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


def command(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    result = convert(args.source, quant=args.quant, outtype=args.outtype, out=args.out, cache=args.cache)
    if args.json:
        print(json.dumps({"path": str(result.path), "arch": result.arch, "outtype": result.outtype,
                          "quant": result.quant, "bytes": result.size_bytes}))
    else:
        print(result.path)
    return 0
