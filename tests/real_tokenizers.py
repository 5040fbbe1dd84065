"""Real Hugging Face tokenizers rebuilt from the vocabulary files llama.cpp ships for its own tests.

llama.cpp's converter recognises a byte-level BPE tokenizer by the hash of its tokens for a fixed text,
so a tokenizer trained in a test is refused. llama.cpp's sources (the llama-cpp-python sdist) hold the
real vocabularies of Llama-3 and Qwen2 as GGUF files (tokens, types, merges) with texts and their
expected tokens (.inp/.out). From them this module rebuilds each model's tokenizer.json: the token ids
for those texts and the converter's hash match the originals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from models.gguf_header import read_header

VOCABS = ("llama-bpe", "qwen2")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits digits one by one
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"
NORMAL, CONTROL = 1, 3  # llama.cpp token types


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
    meta = read_header(vocab_file).metadata
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
