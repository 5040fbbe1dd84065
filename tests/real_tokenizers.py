"""Real Hugging Face tokenizers rebuilt from the vocabulary files llama.cpp ships for its own tests.

llama.cpp's converter recognises a byte-level BPE tokenizer by the hash of its tokens for a fixed text,
so a tokenizer trained in a test is refused. llama.cpp's sources (the llama-cpp-python sdist) hold the
real vocabularies of Llama-3 and Qwen2 as GGUF files (tokens, types, merges) with texts and their
expected tokens (.inp/.out). From them this module rebuilds each model's tokenizer.json: the token ids
for those texts and the converter's hash match the originals.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

VOCABS = ("llama-bpe", "qwen2")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits digits one by one
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"
NORMAL, CONTROL = 1, 3  # llama.cpp token types

# GGUF value types: struct formats of the numeric ones, and the two that nest.
GGUF_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key-value pair of a GGUF file.

    gguf.GGUFReader makes one numpy view per string, about 20 s for a vocabulary's 400k strings on 2
    cores; reading them with struct takes under a second.
    """
    data = path.read_bytes()
    magic, _version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 24

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == GGUF_STRING:
            (size,) = take("Q")
            pos += size
            return data[pos - size:pos].decode("utf-8")
        if kind == GGUF_ARRAY:
            item, count = take("IQ")
            if item in GGUF_NUMBERS:
                return list(take(f"{count}{GGUF_NUMBERS[item]}"))
            return [value(item) for _ in range(count)]
        return take(GGUF_NUMBERS[kind])[0]

    metadata = {}
    for _ in range(n_kv):
        key = value(GGUF_STRING)
        metadata[key] = value(take("I")[0])
    return metadata


@dataclass(frozen=True)
class TokenizerSpec:
    split: str  # the pre-tokenizer's regex
    ignore_merges: bool  # Llama-3 takes a whole word that is in the vocabulary without merging
    nfc: bool  # Qwen2 normalizes to NFC first
    bos: str | None  # added in front of every text
    eos: str
    pad: str | None


SPECS = {
    "llama-bpe": TokenizerSpec(LLAMA3_SPLIT, True, False, "<|begin_of_text|>", "<|eot_id|>", None),
    "qwen2": TokenizerSpec(QWEN2_SPLIT, False, True, None, "<|im_end|>", "<|endoftext|>"),
}


def rebuild(vocab_file: Path, chat_template: str) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer whose vocabulary llama.cpp saved in vocab_file (ggml-vocab-NAME.gguf)."""
    spec = SPECS[vocab_file.name.removeprefix("ggml-vocab-").removesuffix(".gguf")]
    meta = read_gguf_metadata(vocab_file)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {text: i for i, (text, kind) in enumerate(zip(tokens, types, strict=True)) if kind == NORMAL}
    merges = [tuple(pair.split(" ")) for pair in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens follow the normal ones, so adding them in id order gives them their ids.
    controls = {text: i for i, (text, kind) in enumerate(zip(tokens, types, strict=True)) if kind == CONTROL}
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in controls])
    if {text: tok.token_to_id(text) for text in controls} != controls:
        raise ValueError(f"{vocab_file}: its control tokens do not follow its normal ones")
    if spec.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos,
                                                pad_token=spec.pad, chat_template=chat_template)


def reference_cases(vocab_file: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's texts for a vocabulary and the token ids the original tokenizer gives them."""
    texts = Path(f"{vocab_file}.inp").read_text(encoding="utf-8").split(CASE_SEPARATOR)
    ids = Path(f"{vocab_file}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]
