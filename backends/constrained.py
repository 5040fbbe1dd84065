"""Grammar-constrained decoding with a lazy check: the fast path for JSON on llama.cpp.

llama-cpp-python's `response_format`/`grammar` filters the whole vocabulary through the grammar at every
step (about 8x slower than free text on an H100, 2x on a CPU: docs/measurements.md). Here the token is sampled
freely by llama.cpp's own C sampler chain first, then only that token is checked against the grammar;
the full-vocabulary filter runs only when it is rejected, as llama.cpp's common sampler does. Text the
schema leaves no choice over (backends/jsonwalk.py) is not sampled at all but evaluated in one batch.
The result obeys the grammar exactly like the slow path, and only the loop itself is Python.
"""
from __future__ import annotations

import codecs
import ctypes
import math
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from backends.base import BackendError, DeadlineExceeded
from backends.jsonwalk import JsonWalker, WalkError

PENALTY_LAST_N = 64  # sampled tokens the repeat penalty looks back over


@dataclass
class DecodeStats:
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    rejected: int  # sampled tokens the grammar refused (each costs one full-vocabulary filter)
    forced: int  # tokens evaluated in batches because the schema left no choice


class Sampler:
    """A C sampler chain plus an optional grammar, for one generation."""

    def __init__(self, llm: llama_cpp.Llama, grammar: str | None, *, temperature: float, top_p: float, seed: int,
                 repeat_penalty: float = 1.0):
        self._llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        params = llama_cpp.llama_sampler_chain_default_params()
        self.chain = llama_cpp.llama_sampler_chain_init(params)
        # Only sampled tokens reach the penalty's history (a rejected one too): forced JSON structure never does.
        steps = [llama_cpp.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, repeat_penalty, 0.0, 0.0),
                 llama_cpp.llama_sampler_init_top_k(40), llama_cpp.llama_sampler_init_top_p(top_p, 1)]
        if temperature > 0:
            steps += [llama_cpp.llama_sampler_init_temp(temperature), llama_cpp.llama_sampler_init_dist(seed)]
        else:
            steps += [llama_cpp.llama_sampler_init_greedy()]
        for step in steps:
            llama_cpp.llama_sampler_chain_add(self.chain, step)
        self.grammar = None
        if grammar is not None:
            self.grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not self.grammar:
                self.close()
                raise BackendError("llama.cpp rejected the task's grammar (see the log above for the rule)")
        # One-token candidate array for the cheap check, and a full one for the rare filter.
        self._one = (llama_cpp.llama_token_data * 1)()
        self._full = (llama_cpp.llama_token_data * self._n_vocab)()
        self._full_np = np.ctypeslib.as_array(self._full)
        self._ids = np.arange(self._n_vocab, dtype=np.int32)

    def _allowed(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        cur = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return not math.isinf(self._one[0].logit)

    def _sample_filtered(self) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        self._full_np["id"] = self._ids
        self._full_np["logit"] = logits
        self._full_np["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(self._full, self._n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(cur))
        if cur.selected < 0:
            raise BackendError("the grammar allowed no token: the model and grammar disagree on the vocabulary")
        return cur.data[cur.selected].id

    def accept_forced(self, tokens: list[int]) -> list[int]:
        """Accept tokens the model had no choice over, up to the first the grammar refuses."""
        for i, token in enumerate(tokens):
            if self.grammar is not None:
                if not self._allowed(token):
                    return tokens[:i]
                llama_cpp.llama_sampler_accept(self.grammar, token)
        return tokens

    def sample(self) -> tuple[int, bool]:
        """The next token, and whether the grammar had to filter the full vocabulary for it."""
        token = llama_cpp.llama_sampler_sample(self.chain, self._llm.ctx, -1)
        if self.grammar is None:
            return token, False
        rejected = not self._allowed(token)
        if rejected:
            token = self._sample_filtered()
            llama_cpp.llama_sampler_accept(self.chain, token)  # the penalty's history holds what was written
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token, rejected

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def decode(llm: llama_cpp.Llama, sampler: Sampler, max_tokens: int, deadline: float,
           walker: JsonWalker | None = None) -> DecodeStats:
    """Sample until end-of-generation (or the walker's JSON is complete), max_tokens, or the deadline
    (which raises). Text the walker says is forced is evaluated as one batch, never sampled."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    limit = min(max_tokens, llm.n_ctx() - llm.n_tokens)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens: list[int] = []
    pending: list[int] = []  # tokens to evaluate, in one batch, before the next sample
    rejected = forced = 0

    def stats(reason: str) -> DecodeStats:
        return DecodeStats(tokens, reason, rejected, forced)

    while True:
        if walker is not None and walker.forced:
            try:
                offered = llm.tokenize(walker.take_forced().encode(), add_bos=False, special=False)
            except WalkError:
                walker, offered = None, []
            accepted = sampler.accept_forced(offered)
            if len(accepted) < len(offered):  # the grammar disagreed: sample from here on
                walker = None
            forced += len(accepted)
            pending += accepted
        if pending:
            del pending[limit - len(tokens):]  # a forced run never overshoots max_tokens or n_ctx
            llm.eval(pending)
            tokens += pending
            pending = []
        if walker is not None and walker.done:
            return stats("stop")
        if len(tokens) >= limit:
            return stats("length")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"the deadline passed after {len(tokens)} tokens")
        token, was_rejected = sampler.sample()
        rejected += was_rejected
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return stats("stop")
        pending.append(token)
        if walker is not None:
            try:
                walker.feed(text.decode(llm.detokenize([token])))
            except WalkError:
                walker = None
