"""Each low-level llama.cpp call the backend makes, on the embedded model: what it returns, and how it fails."""
import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from backends import llama_lowlevel as ll
from backends.base import Dry
from models.embedded import embedded_model_path

pytestmark = pytest.mark.slow  # the embedded model

PROMPT = "The lighthouse keeper counted the ships each night."


@pytest.fixture(scope="module")
def model():
    m = ll.Model(embedded_model_path(), 0)
    yield m
    m.close()


@pytest.fixture
def ctx(model):
    c = ll.Context(model, n_ctx=512, n_batch=128, n_seq_max=2, flash_attn=False, kv_cache_type="f16", n_threads=2)
    yield c
    c.close()


@contextlib.contextmanager
def llama_log() -> Iterator[io.StringIO]:
    """What llama.cpp logs while the block runs, at every level: llama-cpp-python's log callback prints to
    sys.stderr what its logger's own level lets through (backends.llama_lowlevel sets it to ERROR)."""
    logger = logging.getLogger("llama-cpp-python")
    level, stderr, text = logger.level, sys.stderr, io.StringIO()
    logger.setLevel(logging.DEBUG)
    sys.stderr = text
    try:
        yield text
    finally:
        logger.setLevel(level)
        sys.stderr = stderr


def mappings_of(path: Path) -> int:
    """How many memory mappings of this file the process has (Linux)."""
    name = str(path.resolve())
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip("\n").endswith(" " + name) for line in maps)


def decode_prompt(ctx, batch, tokens, seq):
    batch.clear()
    row = batch.add(tokens, seq, 0, logits_last=True)
    ctx.decode(batch)
    return ctx.logits(row).copy()


def test_a_model_reads_its_metadata_and_vocabulary(model):
    assert model.n_vocab == 49152
    assert model.meta("general.architecture") == "llama" and model.meta("no.such.key") is None
    assert "im_start" in model.chat_template()
    eos = model.special_token("eos")
    assert model.is_eog(eos) and model.piece(eos) == b"<|im_end|>"
    assert not model.is_eog(model.tokenize("a", add_special=False, parse_special=False)[0])
    assert model.adds_bos() is False  # SmolLM2's ChatML template writes its own start


def test_tokenize_and_detokenize_round_trip_any_script(model):
    for text in (PROMPT, "灯塔看守人每晚数着船只。", "Café déjà vu  \n\t spaces"):
        tokens = model.tokenize(text, add_special=False, parse_special=False)
        assert tokens and model.detokenize(tokens).decode() == text
    special = model.tokenize("<|im_start|>user", add_special=False, parse_special=True)
    assert special[0] == model.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]
    assert len(model.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1  # as plain text


def test_threads_detokenizing_at_once_get_their_own_text(model):
    texts = [model.tokenize(t, add_special=False, parse_special=False)
             for t in (PROMPT * 4, "灯塔看守人每晚数着船只。" * 8)]
    expected = [model.detokenize(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: model.detokenize(texts[k % 2]), range(400)))
    assert all(result == expected[k % 2] for k, result in enumerate(results))


def test_a_vocabulary_only_load_tokenizes_the_same(model):
    vocab = ll.Model(embedded_model_path(), 0, vocab_only=True)
    try:
        assert vocab.tokenize(PROMPT, add_special=False, parse_special=False) == \
            model.tokenize(PROMPT, add_special=False, parse_special=False)
    finally:
        vocab.close()


def test_a_file_llama_cpp_cannot_load_raises(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ll.LlamaError, match="could not load"):
        ll.Model(bad, 0)


def test_a_field_a_llama_cpp_struct_lacks_is_refused():
    """ctypes keeps an unknown name as a Python attribute: in 0.3.36 llama_model_params has load_mode, and
    `params.use_mmap = False` never reached llama.cpp."""
    params = llama_cpp.llama_model_default_params()
    with pytest.raises(AttributeError, match=r"llama_model_params has no field 'use_mmap' in llama-cpp-python "
                                             r"0\.3\.36, so llama.cpp would never see it; its fields: .*load_mode"):
        ll.set_fields(params, n_gpu_layers=7, use_mmap=False)
    assert params.n_gpu_layers != 7 and not hasattr(params, "use_mmap")  # nothing written
    assert ll.set_fields(params, load_mode=llama_cpp.LLAMA_LOAD_MODE_NONE).load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("mmap, load_mode", [(True, "mmap"), (False, "none")])
def test_mapping_the_file_or_reading_it_reaches_llama_cpp(mmap, load_mode):
    """The file is mapped into the process only when asked, and llama.cpp names the load mode it was given."""
    path = embedded_model_path()
    before = mappings_of(path)
    with llama_log() as log:
        loaded = ll.Model(path, 0, mmap=mmap)
    try:
        assert (mappings_of(path) > before) is mmap
        assert f"(load_mode = {load_mode})" in log.getvalue()
    finally:
        loaded.close()
    assert mappings_of(path) == before


def test_two_sequences_decode_in_one_batch_and_get_their_own_logits(model, ctx):
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.Batch(128)
    alone = decode_prompt(ctx, batch, tokens, 0)
    ctx.clear()
    batch.clear()
    other = model.tokenize("Completely different words here", add_special=False, parse_special=False)
    row0 = batch.add(tokens, 0, 0, logits_last=True)
    row1 = batch.add(other, 1, 0, logits_last=True)
    assert (row0, row1, batch.n) == (len(tokens) - 1, len(tokens) + len(other) - 1, len(tokens) + len(other))
    ctx.decode(batch)
    together = ctx.logits(row0)
    assert together.shape == (model.n_vocab,)
    assert np.allclose(together, alone, atol=1e-3)  # the other sequence does not leak into this one
    assert not np.allclose(ctx.logits(row1), alone, atol=1e-3)
    batch.close()


def test_a_sequence_keeps_its_prefix_and_writes_a_new_continuation_after_forget(model, ctx):
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    other = model.tokenize(" Then the fog came in.", add_special=False, parse_special=False)
    batch = ll.Batch(128)
    decode_prompt(ctx, batch, tokens, 0)
    ctx.forget(0, 3)  # keep positions 0-2: the start both texts share
    batch.clear()
    row = batch.add(tokens[3:] + other, 0, 3, logits_last=True)
    ctx.decode(batch)
    kept = ctx.logits(row).copy()
    ctx.forget(0)
    fresh = decode_prompt(ctx, batch, tokens + other, 0)
    assert np.allclose(kept, fresh, atol=1e-3)  # the kept cells are as good as evaluating it all again
    assert ctx.n_ctx_seq == ctx.n_ctx // 2  # each of the two sequences has its own half
    batch.close()


def test_a_sequence_past_its_share_of_the_cache_raises_no_kv_room(model):
    small = ll.Context(model, n_ctx=256, n_batch=256, n_seq_max=1, flash_attn=False, kv_cache_type="f16",
                       n_threads=2)
    batch = ll.Batch(256)
    try:
        batch.add([model.special_token("eos")] * 256, 0, 0, logits_last=True)
        small.decode(batch)
        batch.clear()
        batch.add([model.special_token("eos")], 0, 256, logits_last=True)
        with pytest.raises(ll.NoKvRoom):
            small.decode(batch)
    finally:
        batch.close()
        small.close()


def test_a_batch_refuses_more_tokens_than_it_holds_and_none_at_all():
    batch = ll.Batch(4)
    with pytest.raises(ll.LlamaError, match="cannot add 5 tokens"):
        batch.add([1, 2, 3, 4, 5], 0, 0, logits_last=True)
    with pytest.raises(ll.LlamaError, match="cannot add 0 tokens"):
        batch.add([], 0, 0, logits_last=True)
    batch.close()


def test_the_sampler_chain_draws_only_from_what_the_logits_allow(model, ctx):
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.Batch(128)
    logits = decode_prompt(ctx, batch, tokens, 0)
    greedy = ll.SamplerChain(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=1)
    assert greedy.sample(ctx, len(tokens) - 1) == int(np.argmax(logits))
    view = ctx.logits(len(tokens) - 1)
    view[:] = -np.inf
    view[1234] = 0.0  # what a constraint mask leaves
    warm = ll.SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=1.1, seed=7)
    assert warm.sample(ctx, len(tokens) - 1) == 1234
    greedy.close()
    warm.close()
    batch.close()


def test_a_decode_returns_only_when_its_results_are_ready(model, ctx, monkeypatch):
    """On CUDA llama_decode returns once the work is queued: a clock read after Context.decode would time
    kernel launches (1,952 tok/s learned on the H200 where answers ran at ~225). It synchronizes first."""
    calls = []
    real_decode, real_sync = llama_cpp.llama_decode, llama_cpp.llama_synchronize
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, b: calls.append(("decode", c)) or real_decode(c, b))
    monkeypatch.setattr(llama_cpp, "llama_synchronize", lambda c: calls.append(("synchronize", c)) or real_sync(c))
    batch = ll.Batch(128)
    decode_prompt(ctx, batch, model.tokenize(PROMPT, add_special=False, parse_special=False), 0)
    batch.close()
    assert calls == [("decode", ctx.ptr), ("synchronize", ctx.ptr)]


def test_the_repeat_penalty_sees_only_the_tokens_a_sequence_went_on_with(model, ctx):
    """A draw the grammar refused is not accepted: the penalty's window holds accepted tokens only."""
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.Batch(128)
    logits = decode_prompt(ctx, batch, tokens, 0)
    chain = ll.SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=2.0, seed=3)
    top = int(np.argmax(logits))
    chain.draw(ctx, len(tokens) - 1)  # drawn, then refused: never accepted
    view = ctx.logits(len(tokens) - 1)
    chain.penalize(view)
    assert view[top] == logits[top]
    chain.accept(top)
    chain.penalize(view)
    assert view[top] == pytest.approx(logits[top] / 2.0 if logits[top] > 0 else logits[top] * 2.0)
    chain.close()
    batch.close()


def test_the_version_is_the_pinned_one():
    assert ll.version() == "0.3.36"


def test_dry_holds_back_a_token_that_would_extend_a_repeat(model, ctx):
    """llama.cpp's DRY sampler in the chain: after "sun moon star sky sun moon star", "sky" would make the
    repeat 4 tokens long (2 allowed): it loses 0.8 x 1.75^(3 - 2) = 1.4 of its logit, and another token wins.
    A draw is not accepted into DRY's history: only what the sequence goes on with is."""
    words = [model.tokenize(f" {w}", add_special=False, parse_special=False) for w in ("sun", "moon", "star", "sky")]
    assert all(len(w) == 1 for w in words)
    sun, moon, star, sky = (w[0] for w in words)
    other = model.tokenize(" river", add_special=False, parse_special=False)[0]
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.Batch(128)
    decode_prompt(ctx, batch, tokens, 0)
    row = len(tokens) - 1

    def leaning_to_sky(chain: ll.SamplerChain) -> int:
        view = ctx.logits(row)
        view[:] = -np.inf
        view[sky], view[other] = 2.0, 1.5
        return chain.draw(ctx, row)

    plain = ll.SamplerChain(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=1)
    dry = ll.SamplerChain(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=1, dry=Dry(), model=model)
    for chain in (plain, dry):
        for token in (sun, moon, star, sky, sun, moon):
            chain.accept(token)
    assert leaning_to_sky(plain) == sky and leaning_to_sky(dry) == sky  # "sun moon" went on with star: no repeat
    for chain in (plain, dry):
        chain.accept(star)
    assert leaning_to_sky(plain) == sky
    assert leaning_to_sky(dry) == other
    assert leaning_to_sky(dry) == other  # the first draw left no trace
    plain.close()
    dry.close()
    batch.close()


def test_the_repeat_penalty_leaves_punctuation_and_line_breaks_alone(model, ctx):
    exempt = ll.exempt_tokens(model)
    period, newline, sun = (model.tokenize(t, add_special=False, parse_special=False)[0] for t in (".", "\n", " sun"))
    assert exempt[period] and exempt[newline] and not exempt[sun]
    tokens = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.Batch(128)
    logits = decode_prompt(ctx, batch, tokens, 0).copy()
    chain = ll.SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=2.0, seed=3, exempt=exempt)
    for token in (period, newline, sun):
        chain.accept(token)
    view = ctx.logits(len(tokens) - 1)
    chain.penalize(view)
    assert view[period] == logits[period] and view[newline] == logits[newline]
    assert view[sun] == pytest.approx(logits[sun] / 2.0 if logits[sun] > 0 else logits[sun] * 2.0)
    chain.close()
    batch.close()
