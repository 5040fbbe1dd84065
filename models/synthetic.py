"""A GGUF file with a real model's shapes and tokenizer but random weights, quantized by llama.cpp.

Speed and memory depend on shapes, not on weight values (facts.md), so a Llama-3.1-8B-shaped Q4_K_M file
written here stands in for the 5 GB download on a machine that reaches no model hub (the GPU check).
Every tensor is written in F16 from one repeated block of small random numbers (norms are ones), streamed
tensor by tensor, then `llama_model_quantize` turns the file into the asked type. The tokenizer is copied
from another GGUF: for Llama-3.1 shapes the llama-bpe vocabulary that ships in llama.cpp's sources; the
tiny shape, for tests, takes any model's (the embedded SmolLM2's).

    python -m models.synthetic --shape llama-3.1-8b --vocab ggml-vocab-llama-bpe.gguf --out 8b.gguf
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

log = logging.getLogger(__name__)
T = gguf.MODEL_TENSOR
BLOCK = 1 << 20  # random values repeated to fill every tensor
# Llama-3's chat format, for vocabularies that carry no template (the miner refuses a GGUF without one).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int
    rope_theta: float


SHAPES = {
    "llama-3.1-8b": Shape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, context_length=131072,
                          rope_theta=500000.0),
    "tiny": Shape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, context_length=4096, rope_theta=10000.0),
}


def _tensors(shape: Shape, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of a llama model's tensors, in the order llama.cpp's own converter writes them."""
    kv = shape.n_head_kv * (shape.n_embd // shape.n_head)
    per_block = [(T.ATTN_NORM, (shape.n_embd,)), (T.ATTN_Q, (shape.n_embd, shape.n_embd)),
                 (T.ATTN_K, (kv, shape.n_embd)), (T.ATTN_V, (kv, shape.n_embd)),
                 (T.ATTN_OUT, (shape.n_embd, shape.n_embd)), (T.FFN_NORM, (shape.n_embd,)),
                 (T.FFN_GATE, (shape.n_ff, shape.n_embd)), (T.FFN_UP, (shape.n_ff, shape.n_embd)),
                 (T.FFN_DOWN, (shape.n_embd, shape.n_ff))]
    name = lambda kind, bid=None: gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"  # noqa: E731
    tensors = [(name(T.TOKEN_EMBD), (n_vocab, shape.n_embd))]
    tensors += [(name(kind, bid), dims) for bid in range(shape.n_layer) for kind, dims in per_block]
    return tensors + [(name(T.OUTPUT_NORM), (shape.n_embd,)), (name(T.OUTPUT), (n_vocab, shape.n_embd))]


def _copy_tokenizer(writer: gguf.GGUFWriter, vocab: gguf.GGUFReader) -> int:
    """Copy every tokenizer.* key; return the vocabulary's size."""
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub)
    if "tokenizer.chat_template" not in vocab.fields:
        writer.add_chat_template(LLAMA3_TEMPLATE)
    return len(vocab.fields["tokenizer.ggml.tokens"].data)


def write_f16(dest: Path, shape: Shape, vocab_path: Path, name: str, seed: int = 0) -> int:
    """Write the F16 file; return its size in bytes."""
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_name(name)
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_vocab = _copy_tokenizer(writer, gguf.GGUFReader(str(vocab_path)))
    writer.add_vocab_size(n_vocab)
    tensors = _tensors(shape, n_vocab)
    for tensor_name, dims in tensors:
        dtype = np.float32 if len(dims) == 1 else np.float16
        writer.add_tensor_info(tensor_name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    block = np.random.default_rng(seed).normal(0.0, 0.02, BLOCK).astype(np.float16)
    for _, dims in tensors:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(np.resize(block, dims))
    writer.close()
    return dest.stat().st_size


def make(dest: Path, shape: str, vocab_path: Path, quant: str = "Q4_K_M", threads: int = 0) -> Path:
    """The quantized file at dest (the F16 file beside it is removed once quantized)."""
    # Imported here: writing the F16 file needs no llama.cpp (the GPU check writes it while llama.cpp builds).
    from models.quantize import quantize
    f16 = dest.with_name(dest.name + ".f16")
    started = time.monotonic()
    size = write_f16(f16, SHAPES[shape], vocab_path, f"{shape} synthetic (random weights)")
    log.info("wrote %s: %.2f GB of F16 in %.0f s", f16, size / 1e9, time.monotonic() - started)
    started = time.monotonic()
    try:
        quantize(f16, dest, quant, threads)
    finally:
        f16.unlink(missing_ok=True)
    log.info("quantized to %s: %.2f GB in %.0f s", quant, dest.stat().st_size / 1e9, time.monotonic() - started)
    return dest


def main(argv: list[str] | None = None) -> int:
    from models.quantize import FTYPES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--vocab", type=Path, required=True, help="a GGUF whose tokenizer the file gets")
    parser.add_argument("--quant", choices=list(FTYPES), default="Q4_K_M")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    print(make(args.out, args.shape, args.vocab, args.quant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
