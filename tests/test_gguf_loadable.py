"""GGUF files the pinned llama.cpp cannot load, told from their header alone: Mixtral with one tensor per expert
(TheBloke's Dec 2023 layout) and unknown architectures. Tiny files written by gguf-py's GGUFWriter."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from backends.chain import Chain
from backends.llama_cpp import LlamaCppSettings
from miner.config import ChainSettings
from models.catalog import load_profile
from models.errors import UnloadableModelError
from models.gguf_header import NeedMoreBytes, parse_header, read_header
from models.llama_cpp_source import SourceError, llama_cpp_tree
from models.loadable import KNOWN_ARCHITECTURES, why_unloadable

VOCAB, EMBD, FF, EXPERTS = 32, 8, 16, 2


def write_gguf(path: Path, *, arch: str = "llama", split_experts: bool = False, filler_bytes: int = 0) -> Path:
    """A one-block MoE model of zeros; split_experts: one tensor per expert, as llama.cpp wrote until April 2024.
    filler_bytes: a metadata array that makes the header that much longer (a large vocabulary's stand-in)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(EMBD)
    w.add_feed_forward_length(FF)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(1)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    if filler_bytes:
        w.add_array("test.filler", ["x" * 56] * (filler_bytes // 64))  # 8 bytes of length + 56 of text each
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", zeros(VOCAB, EMBD))
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", zeros(EMBD))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", zeros(EMBD, EMBD))
    w.add_tensor("blk.0.ffn_gate_inp.weight", zeros(EXPERTS, EMBD))
    shapes = {"ffn_gate": (FF, EMBD), "ffn_up": (FF, EMBD), "ffn_down": (EMBD, FF)}
    for name, shape in shapes.items():
        if split_experts:
            for e in range(EXPERTS):
                w.add_tensor(f"blk.0.{name}.{e}.weight", zeros(*shape))
        else:
            w.add_tensor(f"blk.0.{name}_exps.weight", zeros(EXPERTS, *shape))
    w.add_tensor("output_norm.weight", zeros(EMBD))
    w.add_tensor("output.weight", zeros(VOCAB, EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def split(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf", split_experts=True)


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "Mixtral-8x7B-Instruct-v0.1.Q4_K_M.gguf")


def test_experts_one_tensor_each_are_refused_with_a_file_that_works(split: Path, merged: Path) -> None:
    reason = why_unloadable(read_header(split), str(split))
    assert reason == (f"{split}: its MoE experts are stored one tensor each (blk.0.ffn_gate.0.weight), a layout "
                      "llama.cpp dropped in 2024; this llama.cpp cannot load it: use a file converted since, e.g. "
                      "mradermacher/Mixtral-8x7B-Instruct-v0.1-GGUF (`storynet-miner download mixtral-8x7b`)")
    assert "\n" not in reason
    assert why_unloadable(read_header(merged), str(merged)) is None


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    odd = write_gguf(tmp_path / "odd.gguf", arch="storyteller9000")
    reason = why_unloadable(read_header(odd), "odd.gguf")
    assert reason is not None and reason.startswith("odd.gguf: its architecture 'storyteller9000' "
                                                    "(general.architecture) is not one llama.cpp knows")
    assert "`storynet-miner download llama-3.1-8b`" in reason and "\n" not in reason
    with pytest.raises(UnloadableModelError, match="'storyteller9000'"):
        load_profile(odd)


def test_the_architecture_list_is_llama_cpps() -> None:
    """gguf-py's names stand in for llama.cpp's table: every one must be a name the pinned llama.cpp knows."""
    assert {"llama", "qwen2", "qwen2moe", "gemma2", "phi3"} <= KNOWN_ARCHITECTURES
    try:
        source = (llama_cpp_tree(["src/llama-arch.cpp"]) / "src/llama-arch.cpp").read_text()
    except SourceError as e:
        pytest.skip(f"llama.cpp's sources are not at hand: {e}")
    missing = {a for a in KNOWN_ARCHITECTURES if f'"{a}"' not in source}
    assert not missing, f"gguf-py names architectures the pinned llama.cpp does not: {sorted(missing)}"


def test_fit_and_the_backend_start_refuse_with_the_same_line(split: Path) -> None:
    """load_profile is what `fit` and the llama_cpp backend read first; the backend starts in its own engine
    process, whose error becomes the backend's reason in health."""
    reason = why_unloadable(read_header(split), str(split))
    with pytest.raises(UnloadableModelError) as err:
        load_profile(split)
    assert str(err.value) == reason
    chain = Chain.from_config([LlamaCppSettings(type="llama_cpp", name="local", model_path=str(split))],
                              ChainSettings(), require_one=False)
    try:
        [status] = chain.snapshot()
        assert (status.ok, status.detail) == (False, reason)  # not "the file may be corrupt"
    finally:
        chain.close()


def test_a_short_buffer_asks_for_more_bytes_not_damage(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "big.gguf", filler_bytes=200_000).read_bytes()
    header = parse_header(data, "big.gguf")
    for cut in (0, 3, 24, 100, 150_000):
        with pytest.raises(NeedMoreBytes):
            parse_header(data[:cut], "big.gguf")
    assert parse_header(data[:len(data) - 1], "big.gguf") == header  # the tensors' data is not needed
    with pytest.raises(ValueError, match="big.gguf is not a GGUF file"):
        parse_header(b"<html>" + data, "big.gguf")
