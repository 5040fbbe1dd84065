"""JSON-schema constrained decoding with llguidance, the engine vLLM and SGLang use.

One matcher per sequence, compiled from the request's schema by the library. The grammar is checked
lazily, as llama.cpp's own common sampler does: the token is drawn first, and the matcher asked about that
one token (under a microsecond); only when it refuses is the full-vocabulary mask computed (about 0.08 ms
at 128k) and applied to the logits for a second draw. For temperature sampling that is the same
distribution as masking first, without the mask's cost at every step. Text the schema leaves no choice
over comes from the matcher's fast-forward tokens and is evaluated in one batch. Strings stop exactly at
their maxLength, which is what lets answers be sized by time.
"""
from __future__ import annotations

import json
import warnings
from typing import Any

import llguidance
import llguidance.llamacpp
import numpy as np
from llguidance.numpy import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

from backends.base import BackendError
from backends.llama_lowlevel import Model

COMPACT = {"whitespace_flexible": False}  # no whitespace between JSON tokens: nothing to sample there
# Every string's characters are written out here as a regex, with its lengths in the regex's repeat
# counts: llguidance cannot join a pattern with a minLength of about 45 or more, and with no pattern at all
# a string may hold anything JSON can escape. A small model left free writes control characters (the
# 135M demo model filled a whole chapter with \u0002-style escapes): no reader wants them, and each costs
# about six tokens for one character, so the answer runs past the tokens its plan counted on.
CONTROLS = "\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f"  # C0 but the newline, DEL, C1 (regex escapes)
# A string starts with a visible character: a run of spaces meets a minLength and says nothing. Spaces are
# what Python's str.isspace() calls so, as the contract checks with str.strip().
SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Prose that ends on a full sentence: the last character closes one, in any script this miner writes
# (a closing quote or bracket after the mark too). In a task's schema it is the JSON Schema `pattern` beside
# minLength and maxLength, which every backend can read; for llguidance the string can close only on a
# sentence's end, and must have one by its maxLength.
SENTENCE_ENDS = ".!?。！？…」』”’\"')）"
ENDS_ON_SENTENCE = f"[{SENTENCE_ENDS}]$"
FIRST, REST = f"[^{SPACES}{CONTROLS}]", f"[^{CONTROLS}]"  # a string's first character, and the others


def _for_llguidance(schema: Any) -> Any:
    """The schema as llguidance can compile it: each string a regex of what it may hold (no control
    characters, a visible first character, a sentence's end last where it is prose), lengths included."""
    if isinstance(schema, list):
        return [_for_llguidance(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _for_llguidance(v) for k, v in schema.items()}
    if out.get("type") != "string" or "enum" in out or "const" in out:
        return out
    if out.get("pattern") == ENDS_ON_SENTENCE:
        lo, hi = max(out.pop("minLength", 2), 2), out.pop("maxLength")  # a first and a last character at least
        out["pattern"] = f"^{FIRST}{REST}{{{lo - 2},{hi - 2}}}[{SENTENCE_ENDS}]$"
    elif "pattern" not in out:
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", None)
        if hi == 0:
            out["pattern"] = "^$"
            return out
        body = f"{FIRST}{REST}{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        out["pattern"] = f"^{body}$" if lo > 0 else f"^({body})?$"
    return out


class Vocabulary:
    """The model's vocabulary as llguidance sees it (built once: 0.3-1 s on a 128k vocabulary)."""

    def __init__(self, model: Model):
        self.n_vocab = model.n_vocab
        with warnings.catch_warnings():  # the bridge calls llama_token_get_attr, deprecated in 0.3.36, per token
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(model.vocab)

    def matcher(self, schema: dict[str, Any]) -> Matcher:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_for_llguidance(schema)),
                                                                defaults=COMPACT)
        return Matcher(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.n_vocab)


class Matcher:
    """The schema's state for one sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        if matcher.is_error():
            raise BackendError(f"cannot constrain output to the schema: {matcher.get_error()}")
        self.ll = matcher
        self.bits = allocate_token_bitmask(1, n_vocab)

    def allows(self, token: int) -> bool:
        """Whether the schema lets this token come next."""
        return self.ll.validate_tokens([token]) == 1

    def restrict(self, logits: np.ndarray) -> None:
        """Set every token the schema refuses next to -inf, in place."""
        fill_next_token_bitmask(self.ll, self.bits)
        apply_token_bitmask_inplace(logits, self.bits[0])

    def consume(self, tokens: list[int]) -> None:
        if not self.ll.consume_tokens(tokens):
            raise BackendError(f"the constraint refused a token: {self.ll.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the schema forces next, consumed already."""
        tokens = self.ll.compute_ff_tokens()
        if tokens:
            self.consume(tokens)
        return tokens

    @property
    def done(self) -> bool:
        """The JSON value is complete: nothing may follow."""
        return self.ll.is_stopped()
