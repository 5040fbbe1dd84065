"""A GGUF file with a real model's shapes and tokenizer but random weights, written straight in its final
quantized types.

Speed and memory depend on shapes, not on weight values (docs/measurements.md), so a Llama-3.1-8B-shaped Q4_K_M file
written here stands in for the 5 GB download on a machine that reaches no model hub (the GPU check). Each
tensor gets the ggml type llama.cpp's quantizer would give it (models.catalog.MIXES: Q4_K, with Q6_K for the
output and for attn_v and ffn_down in the layers it treats as sensitive; norms F32) and is filled with
random quantized blocks whose scales are set so that weights come out small and finite (about N(0, 0.02)):
no F16 file and no quantizer run, which took 25 s and 84 s of the GPU machine's time. The tokenizer is copied
from another GGUF: for Llama-3.1 shapes the llama-bpe vocabulary that ships in llama.cpp's sources; the
tiny shape, for tests, takes any model's (the embedded SmolLM2's). gguf-py only writes the blocks; it needs
no llama.cpp, so the GPU check writes the file while llama.cpp builds.

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

from models.catalog import MIXES, more_bits

log = logging.getLogger(__name__)
T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
POOL_BLOCKS = 4096  # random blocks repeated to fill every tensor
FILE_TYPES = {"Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# Where each block type keeps its f16 scales (byte offset: value), chosen so that the dequantized weights of
# random quants have a mean near 0 and a spread near 0.02 (gguf.quants.dequantize; tests/test_gpu_tools.py).
SCALES = {Q.Q4_K: {0: 7e-5, 2: 5.2e-4},  # d, dmin: w = d * scale * q - dmin * min
          Q.Q6_K: {208: 1.5e-5},  # d: w = d * scale * (q - 32)
          Q.Q4_0: {0: 4.5e-3}}  # d: w = d * (q - 8)
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
    # Llama-3's 128k vocabulary on small layers: what the per-token work of a 128k model costs (masks,
    # sampling), at a speed a CPU can bench
    "small-128k": Shape(n_layer=4, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4, context_length=16384,
                        rope_theta=500000.0),
}


def tensors(shape: Shape, n_vocab: int, quant: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, numpy shape, ggml type) of a llama model's tensors, in the order llama.cpp's converter writes them."""
    base, output, bumped = (Q[name] if name else None for name in MIXES[quant])
    kv = shape.n_head_kv * (shape.n_embd // shape.n_head)
    name = lambda kind, bid=None: gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"  # noqa: E731
    out = [(name(T.TOKEN_EMBD), (n_vocab, shape.n_embd), base)]
    for bid in range(shape.n_layer):
        sensitive = bumped if bumped is not None and more_bits(bid, shape.n_layer) else base
        out += [(name(T.ATTN_NORM, bid), (shape.n_embd,), Q.F32),
                (name(T.ATTN_Q, bid), (shape.n_embd, shape.n_embd), base),
                (name(T.ATTN_K, bid), (kv, shape.n_embd), base),
                (name(T.ATTN_V, bid), (kv, shape.n_embd), sensitive),
                (name(T.ATTN_OUT, bid), (shape.n_embd, shape.n_embd), base),
                (name(T.FFN_NORM, bid), (shape.n_embd,), Q.F32),
                (name(T.FFN_GATE, bid), (shape.n_ff, shape.n_embd), base),
                (name(T.FFN_UP, bid), (shape.n_ff, shape.n_embd), base),
                (name(T.FFN_DOWN, bid), (shape.n_embd, shape.n_ff), sensitive)]
    return out + [(name(T.OUTPUT_NORM), (shape.n_embd,), Q.F32), (name(T.OUTPUT), (n_vocab, shape.n_embd), output)]


def random_blocks(kind: Q, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random blocks of a quantized type, as bytes (n, block bytes), with sane scales."""
    blocks = rng.integers(0, 256, (n, gguf.GGML_QUANT_SIZES[kind][1]), dtype=np.uint8)
    for offset, value in SCALES[kind].items():
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks


def nbytes(dims: tuple[int, ...], kind: Q) -> int:
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(dims)) // per_block * block_bytes


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


def write(dest: Path, shape: Shape, vocab_path: Path, name: str, quant: str = "Q4_K_M", seed: int = 0) -> int:
    """Write the file, tensor by tensor; return its size in bytes."""
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
    writer.add_file_type(FILE_TYPES[quant])
    n_vocab = _copy_tokenizer(writer, gguf.GGUFReader(str(vocab_path)))
    writer.add_vocab_size(n_vocab)
    layout = tensors(shape, n_vocab, quant)
    for tensor_name, dims, kind in layout:
        writer.add_tensor_info(tensor_name, dims, np.dtype(np.float32), nbytes(dims, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    pools = {kind: random_blocks(kind, POOL_BLOCKS, rng) for kind in {k for _, _, k in layout} if kind != Q.F32}
    for _, dims, kind in layout:
        if kind == Q.F32:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(np.resize(pools[kind], (nbytes(dims, kind) // pools[kind].shape[1],
                                                             pools[kind].shape[1])))
    writer.close()
    return dest.stat().st_size


def make(dest: Path, shape: str, vocab_path: Path, quant: str = "Q4_K_M") -> Path:
    started = time.monotonic()
    size = write(dest, SHAPES[shape], vocab_path, f"{shape} synthetic (random weights)", quant)
    log.info("wrote %s: %.2f GB of %s in %.0f s", dest, size / 1e9, quant, time.monotonic() - started)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--vocab", type=Path, required=True, help="a GGUF whose tokenizer the file gets")
    parser.add_argument("--quant", choices=list(FILE_TYPES), default="Q4_K_M")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    print(make(args.out, args.shape, args.vocab, args.quant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
