"""Tokenizer metadata for GGUF files: byte-level BPE (Llama-3, Qwen2) and SentencePiece (Mixtral).

llama.cpp tokenizes from what is written here, so token texts, types, merges and the special ids must
match the Hugging Face tokenizer exactly; tests compare the two tokenizations on the same strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

TokenType = gguf.TokenType


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file and the fix.

    Defined here, in the lowest module of the converter, so models.convert can share it.
    """

# llama.cpp's own spellings of added tokens that checkpoints forget to mark special.
_CONTROL_LOOKING = (("<|", "|>"), ("<｜", "｜>"))


def _looks_like_control(text: str) -> bool:
    return any(text.startswith(a) and text.endswith(b) for a, b in _CONTROL_LOOKING)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing; the checkpoint needs it to convert its tokenizer")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _padded(n_vocab: int, known: int, what: Path) -> None:
    if known > n_vocab:
        raise ConversionError(
            f"{what} holds {known} tokens but config.json says vocab_size={n_vocab}; "
            "the tokenizer does not belong to these weights"
        )


def add_bpe_vocab(writer: gguf.GGUFWriter, model_dir: Path, pre: str, n_vocab: int) -> None:
    """Write a byte-level BPE vocabulary from tokenizer.json (tokenizer model 'gpt2')."""
    path = model_dir / "tokenizer.json"
    spec = _read_json(path)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{path}: expected a BPE tokenizer model, found {model.get('type')!r}")
    by_id: dict[int, tuple[str, TokenType]] = {
        i: (text, TokenType.NORMAL) for text, i in model["vocab"].items()
    }
    for added in spec.get("added_tokens", []):
        control = added.get("special") or _looks_like_control(added["content"])
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if control else TokenType.USER_DEFINED)
    _padded(n_vocab, max(by_id) + 1, path)
    # Ids the tokenizer never uses still need rows: the embedding matrix is padded to vocab_size.
    entries = [by_id.get(i) or (f"[PAD{i}]", TokenType.UNUSED) for i in range(n_vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([text for text, _ in entries])
    writer.add_token_types([int(kind) for _, kind in entries])
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


# First matching SentencePiece predicate gives the type; anything else is a normal piece.
_SPM_TYPES: tuple[tuple[str, TokenType], ...] = (
    ("IsUnknown", TokenType.UNKNOWN),
    ("IsControl", TokenType.CONTROL),
    ("IsUnused", TokenType.UNUSED),
    ("IsByte", TokenType.BYTE),
)


def _spm_type(processor: Any, token_id: int) -> TokenType:
    checks: list[tuple[Callable[[int], bool], TokenType]] = [
        (getattr(processor, name), kind) for name, kind in _SPM_TYPES
    ]
    return next((kind for check, kind in checks if check(token_id)), TokenType.NORMAL)


def add_spm_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    """Write a SentencePiece vocabulary from tokenizer.model (tokenizer model 'llama')."""
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise ConversionError(f"{path} is missing; a SentencePiece model needs it to convert its tokenizer")
    processor = SentencePieceProcessor(model_file=str(path))
    pieces = [
        (processor.IdToPiece(i), processor.GetScore(i), _spm_type(processor, i))
        for i in range(processor.vocab_size())
    ]
    pieces += _spm_added_tokens(model_dir, len(pieces))
    _padded(n_vocab, len(pieces), path)
    pieces += [(f"[PAD{i}]", -1000.0, TokenType.UNUSED) for i in range(len(pieces), n_vocab)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _, _ in pieces])
    writer.add_token_scores([score for _, score, _ in pieces])
    writer.add_token_types([int(kind) for _, _, kind in pieces])
    gguf.SpecialVocab(model_dir, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _spm_added_tokens(model_dir: Path, first_id: int) -> list[tuple[str, float, TokenType]]:
    """Tokens tokenizer.json adds after the SentencePiece pieces, in id order."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return []
    added = sorted(
        (t for t in _read_json(path).get("added_tokens", []) if t["id"] >= first_id), key=lambda t: t["id"]
    )
    for expected, token in enumerate(added, start=first_id):
        if token["id"] != expected:
            raise ConversionError(f"{path}: added token ids must follow the SentencePiece ids without gaps")
    return [
        (t["content"], -1000.0, TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
        for t in added
    ]


VOCAB_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Path, str, int], None]] = {
    "bpe": add_bpe_vocab,
    "spm": lambda writer, model_dir, _pre, n_vocab: add_spm_vocab(writer, model_dir, n_vocab),
}
