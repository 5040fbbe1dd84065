"""Experts kept in system RAM, as llama.cpp's --n-cpu-moe, on a tiny Mixtral that llama.cpp's own converter
made from test_convert's random transformers checkpoint (2 blocks of 4 experts, 2 used a token): llama.cpp's
log names each expert tensor it put in a CPU buffer, and greedy decoding writes the same tokens as without.
With a CUDA build the same tests keep the experts off a GPU that holds every other layer."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from backends import llama_lowlevel as ll
from backends.llama_cpp import LlamaCppSettings, load_planned, use_mmap
from models import fit
from tests.test_llama_lowlevel import llama_log

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # what the converter writes for Mixtral
# src/llama-model-loader.cpp, at debug level, for each tensor an override matched
OVERRIDDEN = re.compile(r"tensor (\S+) \(\d+ MiB \w+\) buffer type overridden to (\S+)")
PROMPT = "Hello world, the quick brown fox"


@pytest.fixture(scope="module")
def mixtral(converted) -> Path:
    """test_convert's Mixtral checkpoint, converted to f32 by llama.cpp's own converter."""
    return converted("mixtral")


def greedy(model: ll.Model, ctx: ll.Context, n: int) -> list[int]:
    tokens = model.tokenize(PROMPT, add_special=True, parse_special=False)
    batch, chain = ll.Batch(64), ll.SamplerChain(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=1)
    written: list[int] = []
    try:
        row = batch.add(tokens, 0, 0, logits_last=True)
        for pos in range(len(tokens), len(tokens) + n):
            ctx.decode(batch)
            written.append(chain.sample(ctx, row))
            batch.clear()
            row = batch.add(written[-1:], 0, pos, logits_last=True)
    finally:
        batch.close()
        chain.close()
    return written


def test_the_patterns_are_llama_cpps_n_cpu_moe_ones():
    """One regex per block, searched in each tensor name (common/common.h: blk\\.%d then LLM_FFN_EXPS_REGEX)."""
    patterns = ll.experts_in_ram(2)
    assert patterns[1] == rb"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    found = lambda name: [i for i, p in enumerate(patterns) if re.search(p.decode(), name)]  # noqa: E731
    assert found("blk.0.ffn_gate_exps.weight") == [0] and found("blk.1.ffn_down_exps.weight") == [1]
    assert found("blk.1.ffn_gate_up_exps.weight") == [1] and found("blk.0.ffn_up_chexps.weight") == [0]
    for other in ("blk.11.ffn_up_exps.weight", "blk.21.ffn_up_exps.weight", "blk.0.ffn_gate_inp.weight",
                  "blk.0.ffn_up_shexp.weight", "blk.0.attn_q.weight", "blk.2.ffn_up_exps.weight"):
        assert found(other) == [], other
    assert ll.experts_in_ram(0) == []
    with pytest.raises(ValueError, match="n_cpu_moe must be 0 or more"):
        ll.experts_in_ram(-1)


def test_the_overrides_are_a_null_terminated_array_of_the_cpu_buffer_type():
    cpu = ll.cpu_buffer_type()
    array = ll.buft_overrides(ll.experts_in_ram(2), cpu)
    assert cpu and [(e.pattern, e.buft) for e in array] == [(p, cpu) for p in ll.experts_in_ram(2)] + [(None, None)]


def test_experts_in_ram_are_read_not_mapped_unless_mapping_is_asked(tmp_path: Path):
    """llama.cpp warns "tensor overrides to CPU are used with mmap enabled - consider using --load-mode none
    for better performance" (src/llama-model-loader.cpp)."""
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF")
    assert use_mmap("auto", small, 2) is False and use_mmap(True, small, 2) is True
    assert LlamaCppSettings(type="llama_cpp").n_cpu_moe == "auto"
    with pytest.raises(ValueError, match="n_cpu_moe\n  Value error, must be between 0 and 4096, or auto"):
        LlamaCppSettings(type="llama_cpp", n_cpu_moe=-1)


@pytest.mark.slow
def test_experts_kept_in_ram_are_where_llama_cpp_says_and_write_the_same_tokens(mixtral: Path):
    """The plan's n_cpu_moe reaches llama.cpp through load_planned: every expert tensor of blocks below it,
    and nothing else, goes to a CPU buffer; the file is read, not mapped; the answer does not change."""
    settings = LlamaCppSettings(type="llama_cpp", name="moe", n_threads=2, n_ctx=512, parallel=1)
    plain = fit.plan(mixtral, n_ctx=512, min_ctx=512)
    assert plain.n_layer == 2
    written = {}
    for n_cpu_moe in (0, 1, plain.n_layer):
        with llama_log() as log:
            model, ctx, plan, _ = load_planned(mixtral, dataclasses.replace(plain, n_cpu_moe=n_cpu_moe), settings)
        try:
            assert model.n_cpu_moe == n_cpu_moe and "(load_mode = none)" in log.getvalue()
            assert "overrides to CPU are used with mmap enabled" not in log.getvalue()
            overridden = OVERRIDDEN.findall(log.getvalue())
            assert sorted(name for name, _ in overridden) == sorted(
                f"blk.{i}.{kind}.weight" for i in range(n_cpu_moe) for kind in EXPERT_TENSORS)
            assert all(buft.startswith("CPU") for _, buft in overridden)
            written[n_cpu_moe] = greedy(model, ctx, 12)
        finally:
            ctx.close()
            model.close()
    assert written[0] == written[1] == written[plain.n_layer]
