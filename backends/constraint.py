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
# A run of spaces meets a short minLength and says nothing: short strings must start with a visible
# character. (llguidance cannot combine a pattern with a minLength of about 45 or more, and a run of
# spaces that long is no risk.) Spaces are what Python's str.isspace() calls so, as the contract checks
# with str.strip(). The regex \S lets U+001C-U+001F through, which strip() removes (a trait that came
# back empty after strip() failed a characters answer under load).
SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
VISIBLE_START, VISIBLE_START_BELOW = f"^[^{SPACES}]", 40
# Prose that ends on a full sentence: the last character closes one, in any script this miner writes
# (a closing quote or bracket after the mark too). In a task's schema it is the JSON Schema `pattern` beside
# minLength and maxLength, which every backend can read; llguidance cannot join a pattern with lengths, so
# for it the lengths move into the regex (the string can close only on a sentence's end, and must have one
# by its maxLength).
SENTENCE_ENDS = ".!?。！？…」』”’\"')）"
ENDS_ON_SENTENCE = f"[{SENTENCE_ENDS}]$"


def _for_llguidance(schema: Any) -> Any:
    """The schema as llguidance can compile it: short strings start with a visible character, and prose
    that ends on a sentence has its lengths in its regex."""
    if isinstance(schema, list):
        return [_for_llguidance(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _for_llguidance(v) for k, v in schema.items()}
    if out.get("type") != "string":
        return out
    if out.get("pattern") == ENDS_ON_SENTENCE:
        lo, hi = max(out.pop("minLength", 2), 2), out.pop("maxLength")  # a first and a last character at least
        out["pattern"] = f"^[^{SPACES}][\\s\\S]{{{lo - 2},{hi - 2}}}[{SENTENCE_ENDS}]$"
    elif "pattern" not in out and out.get("minLength", 0) < VISIBLE_START_BELOW:
        out["pattern"] = VISIBLE_START
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
