"""VRAM planning: estimates against docs/measurements.md and published file sizes, plans, a real tiny GGUF."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFWriter

from miner.cli import main as cli
from miner.errors import ConfigError, ModelError
from models import catalog, fit

MiB, GiB = fit.MiB, fit.GiB
no_offload = pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(),
                                reason="checks the CPU-only plan; this llama.cpp can offload")

# docs/measurements.md, Llama-3.1-8B Q4_K_M on an H100: (n_gpu_layers, n_ctx, kv, flash_attn) -> measured MiB range.
# The 28/33 and 20/33 rows do not say whether flash attention was on; at n_ctx 4096 the estimate is the same.
FACTS_8B = [((33, 4096, "f16", True), (5705, 5783)), ((28, 4096, "f16", True), (4987, 4987)),
            ((20, 4096, "f16", True), (3875, 3875)), ((33, 8192, "f16", False), (6523, 6523)),
            ((33, 4096, "q8_0", True), (5465, 5543)), ((33, 8192, "q8_0", True), (5737, 5815))]


def total(profile: catalog.Profile, *setting) -> int:
    return sum(fit.estimate(profile, *setting).values())


@pytest.mark.parametrize("name", list(catalog.MODELS))
def test_sizes_from_shapes_match_the_published_files(name: str) -> None:
    entry = catalog.get(name)
    published = [q for q in entry.quants if q.size_source != "estimate"]
    assert published, f"{name} has no published size to check against"
    for q in published:
        estimated = fit.load_profile(name, q.quant).layout.total
        assert abs(estimated / q.total_bytes - 1) < 0.02, (q.quant, estimated, q.total_bytes)


@pytest.mark.parametrize("setting,measured", FACTS_8B)
def test_8b_estimates_land_on_the_facts_vram_table(setting: tuple, measured: tuple[int, int]) -> None:
    mib = total(fit.load_profile("llama-3.1-8b"), *setting) / MiB
    mid = sum(measured) / 2
    assert abs(mib - mid) / mid < 0.02, f"{setting}: estimated {mib:.0f} MiB, measured {measured}"


def test_6_gib_holds_every_8b_layer_with_the_largest_context_that_fits() -> None:
    p = fit.plan("llama-3.1-8b", vram_bytes=6 * GiB)
    assert (p.n_gpu_layers, p.flash_attn) == (33, True)
    assert p.n_ctx >= 8192 and p.kv_cache_type == "q8_0"
    assert p.estimated_vram_bytes <= fit._usable(6 * GiB)
    assert total(p.profile, 33, p.n_ctx + fit.CTX_STEP, "q8_0", True) > fit._usable(6 * GiB)
    assert "33 of 33: all 32 blocks and the output layer on the GPU" in p.table()


def test_a_big_card_gets_f16_and_the_context_cap() -> None:
    p = fit.plan("llama-3.1-8b", vram_bytes=24 * GiB)
    assert (p.n_gpu_layers, p.n_ctx, p.kv_cache_type) == (33, fit.CTX_CAP_GPU, "f16")


def test_70b_on_6_gib_offloads_as_many_layers_as_fit_and_says_the_speed() -> None:
    p = fit.plan("llama-3.1-70b", vram_bytes=6 * GiB)
    assert 0 < p.n_gpu_layers < p.n_layer
    # not timid: one more block would not fit even at the smallest context and KV cache
    assert total(p.profile, p.n_gpu_layers + 1, 4096, "q8_0", True) > fit._usable(6 * GiB)
    speed = next(n for n in p.notes if "stay on the CPU" in n)
    assert "tok/s" in speed
    assert f"{p.n_layer + 1 - p.n_gpu_layers} of {p.n_layer + 1} layers stay on the CPU" in speed


@pytest.mark.parametrize("gib", [6, 12])
def test_mixtral_keeps_every_layer_on_the_gpu_and_the_fewest_experts_in_ram(gib: int) -> None:
    p = fit.plan("mixtral-8x7b", vram_bytes=gib * GiB)
    assert p.n_gpu_layers == p.n_layer + 1 and 0 < p.n_cpu_moe < p.n_layer
    assert p.estimated_vram_bytes <= fit._usable(gib * GiB)
    # not timid: the experts of one more block on the GPU do not fit even at the smallest context and KV cache
    assert total(p.profile, p.n_layer + 1, 4096, "q8_0", True, p.n_cpu_moe - 1) > fit._usable(gib * GiB)
    ram, vram = fit.reads_per_token(p.profile, p.n_gpu_layers, p.n_cpu_moe)
    # two of eight experts a token: a quarter of the RAM-resident experts, and the rest in VRAM
    in_ram = sum(p.profile.layout.expert_bytes[:p.n_cpu_moe])
    assert ram == pytest.approx(in_ram / 4, rel=1e-6) and vram > 0
    table = p.table()
    assert f"n_cpu_moe          {p.n_cpu_moe}: the experts of blocks 0-{p.n_cpu_moe - 1} in system RAM" in table
    assert f"{ram / GiB:.2f} GiB from system RAM" in table


def test_a_given_n_cpu_moe_is_kept_and_a_dense_model_ignores_it() -> None:
    p = fit.plan("mixtral-8x7b", vram_bytes=32 * GiB, n_cpu_moe=4)
    assert (p.n_gpu_layers, p.n_cpu_moe) == (33, 4)
    dense = fit.plan("llama-3.1-8b", vram_bytes=6 * GiB, n_cpu_moe=4)
    assert dense.n_cpu_moe == 0 and any("n_cpu_moe 4 ignored" in n for n in dense.notes)


def test_out_of_memory_moves_experts_before_layers() -> None:
    p = fit.plan("mixtral-8x7b", vram_bytes=6 * GiB)
    smaller = fit.fewer_layers(p)
    assert smaller.n_gpu_layers == p.n_gpu_layers and smaller.n_cpu_moe > p.n_cpu_moe
    assert smaller.estimated_vram_bytes < p.estimated_vram_bytes


def test_explicit_settings_are_kept() -> None:
    p = fit.plan("llama-3.1-8b", vram_bytes=6 * GiB, n_gpu_layers=20, n_ctx=4096, kv_cache_type="f16",
                 flash_attn=False)
    assert (p.n_gpu_layers, p.n_ctx, p.kv_cache_type, p.flash_attn) == (20, 4096, "f16", False)
    too_big = fit.plan("llama-3.1-8b", vram_bytes=6 * GiB, n_gpu_layers=-1, n_ctx=32768, kv_cache_type="f16")
    assert (too_big.n_gpu_layers, too_big.n_ctx) == (33, 32768)
    assert any(n.startswith("may not fit") for n in too_big.notes)


@pytest.mark.parametrize("settings,message", [
    ({"kv_cache_type": "q4_0"}, "kv_cache_type: expected 'auto' or f16 or q8_0"),
    ({"n_ctx": "big"}, "n_ctx: expected 'auto' or a int"),
    ({"kv_cache_type": "q8_0", "flash_attn": False}, "set flash_attn: true or kv_cache_type: f16")])
def test_bad_settings_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fit.plan("llama-3.1-8b", vram_bytes=6 * GiB, **settings)


def test_fewer_layers_steps_down_to_the_cpu_then_stops() -> None:
    p = fit.plan("llama-3.1-8b", vram_bytes=6 * GiB)
    seen = [p]
    while (nxt := fit.fewer_layers(seen[-1])) is not None:
        seen.append(nxt)
    layers = [s.n_gpu_layers for s in seen]
    assert layers == sorted(set(layers), reverse=True) and layers[-1] == 0 and len(layers) > 5
    assert all(b.estimated_vram_bytes < a.estimated_vram_bytes for a, b in zip(seen, seen[1:]))
    assert all((s.n_ctx, s.kv_cache_type) == (p.n_ctx, p.kv_cache_type) for s in seen)
    assert "out of memory with 33 GPU layers" in seen[1].notes[0]


# ---- a real GGUF file --------------------------------------------------------------------------------

SHAPE = {"n_layer": 3, "n_embd": 64, "n_head": 4, "n_head_kv": 2, "n_ff": 128, "n_vocab": 256, "ctx": 2048}


def write_tiny_llama(path: Path, **writer_args) -> dict[str, int]:
    """A llama-architecture GGUF with real tensors; returns each tensor's byte size."""
    s, rng = SHAPE, np.random.default_rng(0)
    head_dim = s["n_embd"] // s["n_head"]
    shapes = {"token_embd.weight": (s["n_vocab"], s["n_embd"]), "output_norm.weight": (s["n_embd"],),
              "output.weight": (s["n_vocab"], s["n_embd"])}
    for i in range(s["n_layer"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (s["n_embd"],), f"blk.{i}.ffn_norm.weight": (s["n_embd"],),
                   f"blk.{i}.attn_q.weight": (s["n_embd"], s["n_embd"]),
                   f"blk.{i}.attn_k.weight": (s["n_head_kv"] * head_dim, s["n_embd"]),
                   f"blk.{i}.attn_v.weight": (s["n_head_kv"] * head_dim, s["n_embd"]),
                   f"blk.{i}.attn_output.weight": (s["n_embd"], s["n_embd"]),
                   f"blk.{i}.ffn_gate.weight": (s["n_ff"], s["n_embd"]),
                   f"blk.{i}.ffn_up.weight": (s["n_ff"], s["n_embd"]),
                   f"blk.{i}.ffn_down.weight": (s["n_embd"], s["n_ff"])}
    w = GGUFWriter(path, "llama", **writer_args)
    w.add_block_count(s["n_layer"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(s["n_vocab"])])
    sizes = {}
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor(name, data)
        sizes[name] = data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def test_profile_of_a_real_gguf_counts_its_tensors(tmp_path: Path) -> None:
    sizes = write_tiny_llama(tmp_path / "tiny.gguf")
    p = fit.load_profile(tmp_path / "tiny.gguf")
    assert (p.n_layer, p.n_ctx_train, p.n_head, p.n_head_kv, p.head_dim_k, p.n_vocab) == (3, 2048, 4, 2, 16, 256)
    assert p.layout.input_bytes == sizes["token_embd.weight"]
    assert p.layout.output_bytes == sizes["output.weight"] + sizes["output_norm.weight"]
    assert p.layout.block_bytes == tuple(sum(v for k, v in sizes.items() if k.startswith(f"blk.{i}."))
                                         for i in range(3))
    assert p.layout.total == sum(sizes.values())


def test_a_split_gguf_is_read_across_all_parts(tmp_path: Path) -> None:
    sizes = write_tiny_llama(tmp_path / "tiny.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(parts) > 1
    assert fit.load_profile(parts[0]).layout.total == sum(sizes.values())
    parts[-1].unlink()
    with pytest.raises(ModelError, match="part of the split model is missing"):
        fit.load_profile(parts[0])


def test_plan_for_a_real_gguf_with_a_gpu_budget(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "tiny.gguf")
    p = fit.plan(tmp_path / "tiny.gguf", vram_bytes=2 * GiB)
    assert (p.n_gpu_layers, p.n_ctx, p.flash_attn) == (4, 4096, True)  # trained for 2048; min_ctx 4096 wins


@no_offload
def test_cpu_only_plan_puts_nothing_on_a_gpu(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "tiny.gguf")
    assert fit.free_vram_bytes() is None
    p = fit.plan(tmp_path / "tiny.gguf")
    assert (p.n_gpu_layers, p.flash_attn, p.kv_cache_type, p.vram_budget_bytes) == (0, False, "f16", None)
    assert p.n_ctx == 4096 and p.estimated_vram_bytes == 0
    assert p.notes[0].startswith("CPU only") and "scripts/setup.sh --cuda" in p.notes[0]
    assert fit.plan(tmp_path / "tiny.gguf", min_ctx=1024).n_ctx == 2048  # the trained context, capped at 8192
    assert "none: no GPU offload" in p.table()


def test_fit_cli_prints_the_table_or_json(capsys: pytest.CaptureFixture[str], caplog) -> None:
    assert cli(["fit", "--model", "llama-3.1-8b", "--vram-gb", "6"]) == 0
    table = capsys.readouterr().out
    assert "33 of 33" in table and "(--vram-gb 6)" in table
    assert cli(["fit", "--model", "mixtral-8x7b", "--vram-gb", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_gpu_layers"] == 33 and 0 < out["n_cpu_moe"] < 32 and out["estimated_vram_bytes"] <= 6 * GiB
    assert out["ram_bytes_per_token"] > 0 and {a["task"] for a in out["answers"]} == {
        "blueprint", "characters", "story_arc", "chapters"}
    assert cli(["fit", "--model", "no-such-model"]) == 2  # could not do it: the message says what to run
    assert "storynet-miner download NAME" in caplog.text


@pytest.mark.parametrize("rate, said", [(104.2, "100"), (53.4, "53"), (1234.0, "1,200"), (7.62, "7.6"), (0.84, "0.8")])
def test_rates_are_said_in_two_figures_never_in_exponents(rate: float, said: str) -> None:
    assert fit._two_figures(rate) == said


def test_the_5_5_gib_plan_says_its_rate_in_figures_not_1e_02() -> None:
    output_layer_on_the_cpu = fit.plan("llama-3.1-8b", vram_bytes=int(5.5 * GiB))
    assert output_layer_on_the_cpu.n_gpu_layers == 32
    ram, _ = fit.reads_per_token(output_layer_on_the_cpu.profile, 32)
    assert ram == output_layer_on_the_cpu.profile.layout.output_bytes  # only the output layer is read from RAM
    assert "tops out near 23 tok/s per 10 GB/s the host reads" in " ".join(output_layer_on_the_cpu.notes)


def test_6_gb_figures_say_what_they_assume(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["fit", "--model", "llama-3.1-8b", "--vram-gb", "6"]) == 0
    table = capsys.readouterr().out
    assert "--vram-gb plans for 6 GiB free: a card with nothing else on it" in table
    assert "with 5.5 GiB free this becomes 32 of 33 layers on the GPU and 4096 context" in table
    # the speed is a bound from the card's bandwidth, not an H100's measured figure passed off as a 6 GB card's
    assert "tok/s per 100 GB/s of the card's memory bandwidth" in table and "not measured on a 6 GB card" in table
    assert "full decode speed" not in table


def test_fit_piped_into_a_reader_that_left_ends_without_a_traceback() -> None:
    reader_gone = subprocess.Popen([sys.executable, "-m", "miner", "fit", "--model", "llama-3.1-8b", "--vram-gb", "6"],
                                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()  # before the table is written: every write meets a closed pipe, as after `| head`
    err = reader_gone.stderr.read().decode()
    assert reader_gone.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
