"""VRAM planning for llama.cpp: GPU layers, context length, KV cache type and flash attention.

VRAM needed = weights of the GPU layers + KV cache of those layers + compute buffer + CUDA context.
The constants are calibrated on docs/measurements.md's table (Llama-3.1-8B Q4_K_M, H100, VRAM added by loading);
every row of that table is predicted within 1% (tests/test_fit.py). Layers left on the CPU cost ~5x
decode speed, so the planner fills the GPU first and only then grows the context.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib.util
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ConfigError
from models import catalog
from models.catalog import Profile, load_profile

MiB, GiB = 1 << 20, 1 << 30
# CUDA context, cuBLAS workspace and small activations: what every docs/measurements.md row leaves once the terms
# below are taken out (575-585 MiB on the H100; smaller on consumer cards, so this errs safe there).
CUDA_OVERHEAD = 580 * MiB
N_UBATCH = 512               # llama-cpp-python's micro-batch: compute buffers scale with it
MARGIN_SHARE, MARGIN_MIN = 0.05, 256 * MiB  # repeated loads in docs/measurements.md differ by up to 78 MiB
CTX_CAP_GPU = 16384          # beyond this a story miner's KV cache only costs memory
CTX_CPU = 8192               # CPU-only default context
CTX_STEP = 1024
# A dual-channel DDR4 desktop's RAM read rate, to put the CPU side's bound in figures (`fit` measures the
# host's own: models/host.py); decode with weights in RAM is bound by reading them once per token.
EXAMPLE_RAM = ("a dual-channel DDR4 desktop", 20e9)
# A desktop session on the same card (display server, compositor, browser) commonly holds 0.3-1 GiB of it.
DESKTOP_SHARE = 512 * MiB
# A common 6 GB card's memory bandwidth (RTX 2060 and RTX 3060 Laptop: 336 GB/s), to put the bound in figures.
EXAMPLE_CARD = ("an RTX 2060 6 GB", 336e9)
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32}
GGML_GPU_DEVICE_TYPES = (1, 2)  # ggml_backend_dev_type: GPU, IGPU


@dataclass(frozen=True)
class Plan:
    n_gpu_layers: int        # 0..n_layer+1; n_layer+1 = every block and the output layer
    n_ctx: int
    kv_cache_type: str       # "f16" or "q8_0"
    flash_attn: bool
    vram_budget_bytes: int | None   # None: no GPU offload available
    estimated_vram_bytes: int
    notes: list[str]
    model: str = ""
    n_layer: int = 0
    breakdown: tuple[tuple[str, int], ...] = ()
    budget_source: str = ""
    profile: Profile | None = field(default=None, repr=False, compare=False)
    n_cpu_moe: int = 0       # MoE: the expert tensors of blocks 0..n_cpu_moe-1 stay in system RAM

    def table(self) -> str:
        rows = [("model", self.model), ("n_gpu_layers", _layers_text(self))]
        if self.profile is not None and self.profile.n_expert and self.vram_budget_bytes is not None:
            rows.append(("n_cpu_moe", _experts_text(self)))
        rows += [("n_ctx", str(self.n_ctx)), ("kv_cache_type", self.kv_cache_type),
                 ("flash_attn", "on" if self.flash_attn else "off")]
        if self.profile is not None:
            ram, vram = reads_per_token(self.profile, self.n_gpu_layers, self.n_cpu_moe)
            rows.append(("read per token", f"{ram / GiB:.2f} GiB from system RAM, {vram / GiB:.2f} GiB from VRAM"))
        rows += [(f"  {label}", f"{b / MiB:,.0f} MiB") for label, b in self.breakdown]
        if self.vram_budget_bytes is None:
            rows.append(("VRAM budget", "none: no GPU offload"))
        else:
            budget, usable = self.vram_budget_bytes / MiB, _usable(self.vram_budget_bytes) / MiB
            rows += [("estimated VRAM", f"{self.estimated_vram_bytes / MiB:,.0f} MiB"),
                     ("VRAM budget", f"{budget:,.0f} MiB ({self.budget_source}); "
                                     f"{usable:,.0f} MiB after the safety margin")]
        rows += [("note", n) for n in self.notes]
        width = max(len(k) for k, _ in rows)
        lines = [f"{'setting':<{width}}  value", f"{'-' * width}  {'-' * 40}"]
        return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])

    def to_json(self) -> dict:
        ram, vram = reads_per_token(self.profile, self.n_gpu_layers, self.n_cpu_moe) if self.profile else (0, 0)
        return {"model": self.model, "n_gpu_layers": self.n_gpu_layers, "n_cpu_moe": self.n_cpu_moe,
                "ram_bytes_per_token": ram, "vram_bytes_per_token": vram, "n_ctx": self.n_ctx,
                "kv_cache_type": self.kv_cache_type, "flash_attn": self.flash_attn,
                "vram_budget_bytes": self.vram_budget_bytes,
                "estimated_vram_bytes": self.estimated_vram_bytes,
                "budget_source": self.budget_source, "breakdown": dict(self.breakdown), "notes": self.notes}


def _layers_text(p: Plan) -> str:
    n, total = p.n_gpu_layers, p.n_layer + 1
    if n == total:
        return f"{n} of {total}: all {p.n_layer} blocks and the output layer on the GPU"
    if n == 0:
        return f"0 of {total}: every layer on the CPU"
    return f"{n} of {total}: blocks {p.n_layer - n}-{p.n_layer - 1} on the GPU, the rest on the CPU"


def _experts_text(p: Plan) -> str:
    n, total = p.n_cpu_moe, p.n_layer
    if n == 0:
        return "0: every block's experts on the GPU with it"
    on_gpu = range(max(n, p.n_layer - min(p.n_gpu_layers, p.n_layer)), total)
    rest = f", blocks {on_gpu.start}-{total - 1} on the GPU" if len(on_gpu) else ""
    return f"{n}: the experts of blocks 0-{n - 1} in system RAM{rest}"


def _llama_cpp():
    """Import llama_cpp before anything imports numpy: the other order made CUDA loads segfault (docs/measurements.md)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


# ---- the estimate -----------------------------------------------------------------------------------

def _gpu_blocks(p: Profile, n_gpu_layers: int) -> range:
    """llama.cpp puts the last n blocks, then the output layer, on the GPU."""
    return range(p.n_layer - min(n_gpu_layers, p.n_layer), p.n_layer)


def _experts_in_ram(p: Profile, n_gpu_layers: int, n_cpu_moe: int) -> range:
    """The GPU blocks whose expert tensors n_cpu_moe keeps in system RAM."""
    gpu = _gpu_blocks(p, n_gpu_layers)
    return range(gpu.start, max(gpu.start, min(n_cpu_moe, p.n_layer)))


def estimate(p: Profile, n_gpu_layers: int, n_ctx: int, kv_cache_type: str,
             flash_attn: bool, n_cpu_moe: int = 0) -> dict[str, int]:
    """VRAM by purpose for one setting."""
    blocks = len(_gpu_blocks(p, n_gpu_layers))
    output_on_gpu = n_gpu_layers > p.n_layer
    weights = (sum(p.layout.block_bytes[i] for i in _gpu_blocks(p, n_gpu_layers))
               - sum(p.layout.expert_bytes[i] for i in _experts_in_ram(p, n_gpu_layers, n_cpu_moe))
               + (p.layout.output_bytes if output_on_gpu else 0))
    kv = blocks * n_ctx * p.n_head_kv * (p.head_dim_k + p.head_dim_v) * KV_ELEMENT_BYTES[kv_cache_type]
    logits = N_UBATCH * p.n_vocab * 4
    # with the output layer on the CPU, docs/measurements.md shows one more logits-sized buffer (+240 MiB for 8B):
    # llama.cpp still runs the prompt's large matmuls on the GPU
    staging = logits if output_on_gpu else 2 * logits
    scores = 0 if flash_attn else N_UBATCH * n_ctx * p.n_head * 4  # f32 attention scores without FA
    return {"weights on GPU": weights, "KV cache on GPU": int(kv),
            "compute buffer": max(staging, scores),  # ggml reuses memory: the largest peak counts
            "CUDA context": CUDA_OVERHEAD}


def _usable(budget: int) -> int:
    return budget - max(MARGIN_MIN, int(budget * MARGIN_SHARE))


def _two_figures(x: float) -> str:
    """A rough rate as a reader says it: 104 -> "100", 53.4 -> "53", 7.62 -> "7.6"."""
    if x < 10:
        return f"{x:.1f}"
    return f"{round(x, 1 - math.floor(math.log10(x))):,.0f}"


def ram_resident_bytes(p: Profile, n_gpu_layers: int, n_cpu_moe: int = 0) -> int:
    """Bytes of the blocks and output layer left in system RAM (token embeddings, only looked up, not counted)."""
    on_gpu = estimate(p, n_gpu_layers, CTX_STEP, "f16", True, n_cpu_moe)["weights on GPU"]
    return sum(p.layout.block_bytes) + p.layout.output_bytes - on_gpu


def reads_per_token(p: Profile, n_gpu_layers: int, n_cpu_moe: int = 0) -> tuple[int, int]:
    """(bytes from system RAM, bytes from VRAM) one decoded token reads: every dense weight once, and of a MoE
    layer's experts only the share the router picks (two of eight for Mixtral)."""
    share = p.n_expert_used / p.n_expert if p.n_expert else 1.0
    gpu, moved = _gpu_blocks(p, n_gpu_layers), _experts_in_ram(p, n_gpu_layers, n_cpu_moe)
    ram = vram = 0.0
    for i in range(p.n_layer):
        experts = p.layout.expert_bytes[i]
        dense = p.layout.block_bytes[i] - experts
        if i not in gpu:
            ram += dense + experts * share
        else:
            vram += dense
            ram, vram = (ram + experts * share, vram) if i in moved else (ram, vram + experts * share)
    ram, vram = (ram, vram + p.layout.output_bytes) if n_gpu_layers > p.n_layer else (ram + p.layout.output_bytes, vram)
    return int(ram), int(vram)


def _speed_note(p: Profile, n: int, n_cpu_moe: int = 0) -> str:
    if n > p.n_layer and not _experts_in_ram(p, n, n_cpu_moe):
        # every token reads all the weights from VRAM once, so memory bandwidth bounds decode
        weights = sum(p.layout.block_bytes) + p.layout.output_bytes
        card, bandwidth = EXAMPLE_CARD
        return (f"every layer on the GPU: each token reads {weights / GiB:.1f} GiB of weights from VRAM, so decode "
                f"tops out near {_two_figures(100e9 / weights)} tok/s per 100 GB/s of the card's memory bandwidth "
                f"({card}: {bandwidth / 1e9:.0f} GB/s, at most {_two_figures(bandwidth / weights)} tok/s), less in "
                "practice; not measured on a 6 GB card yet (docs/measurements.md: 229 tok/s on an H100, ~225 on an H200, "
                "cards with 10 to 14 times the bandwidth of an RTX 2060)")
    ram, _ = reads_per_token(p, n, n_cpu_moe)
    where = (f"the experts of {len(_experts_in_ram(p, n, n_cpu_moe))} blocks stay in system RAM" if n > p.n_layer
             else f"{p.n_layer + 1 - n} of {p.n_layer + 1} layers stay on the CPU")
    host, rate = EXAMPLE_RAM
    return (f"{where}: {ram / GiB:.1f} GiB of weights are read from system RAM for every token, so decode tops "
            f"out near {_two_figures(10e9 / ram)} tok/s per 10 GB/s the host reads ({host}: {rate / 1e9:.0f} GB/s, at "
            f"most {_two_figures(rate / ram)} tok/s; `storynet-miner fit` measures this host and times each task's "
            "answer; docs/measurements.md, an H100 host: 8B with 28 of 33 layers 45 tok/s, all 33 229 tok/s)")


def _make_plan(p: Profile, n: int, n_ctx: int, kv: str, fa: bool, budget: int | None, source: str,
               notes: list[str], n_cpu_moe: int = 0) -> Plan:
    parts = estimate(p, n, n_ctx, kv, fa, n_cpu_moe) if budget is not None else {}
    notes = notes + ([_speed_note(p, n, n_cpu_moe)] if budget is not None else [])
    return Plan(n, n_ctx, kv, fa, budget, sum(parts.values()), notes, p.name, p.n_layer,
                tuple(parts.items()), source, p, n_cpu_moe)


# ---- planning -----------------------------------------------------------------------------------------

_SETTINGS = {"n_gpu_layers": int, "n_ctx": int, "kv_cache_type": ("f16", "q8_0"), "flash_attn": bool,
             "n_cpu_moe": int}


def _check(name: str, value: object) -> None:
    allowed = _SETTINGS[name]
    ok = value in allowed if isinstance(allowed, tuple) else isinstance(value, allowed)
    if value != "auto" and not ok:
        shown = " or ".join(allowed) if isinstance(allowed, tuple) else f"a {allowed.__name__}"
        raise ConfigError(f"{name}: expected 'auto' or {shown}, got {value!r}")


def _ctx_options(p: Profile, n_ctx: int | str, min_ctx: int, gpu: bool) -> list[int]:
    if n_ctx != "auto":
        return [int(n_ctx) or p.n_ctx_train]  # 0 means the trained context, as in llama.cpp
    if not gpu:  # the KV cache lives in system RAM: no budget to fill
        return [max(min_ctx, min(p.n_ctx_train, CTX_CPU))]
    top = max(min(p.n_ctx_train, CTX_CAP_GPU), min_ctx)
    return [top] + [c for c in range(top - top % CTX_STEP, min_ctx - 1, -CTX_STEP) if c < top]


def _candidates(p: Profile, layers: list[tuple[int, int]], n_ctx: int | str, min_ctx: int, kv: str, fa: bool | str):
    """Settings from most to least wanted: the (layers, n_cpu_moe) pairs in their order, then more context,
    then f16 over q8_0."""
    for n, moe in layers:
        for c in _ctx_options(p, n_ctx, min_ctx, gpu=n > 0):
            # FA: much faster prefill on CUDA (docs/measurements.md); a q8_0 V cache cannot work without it.
            use_fa = fa if fa != "auto" else (n > 0 or kv == "q8_0")
            for k in ([kv] if kv != "auto" else ["f16", "q8_0"] if use_fa else ["f16"]):
                yield n, c, k, use_fa, moe


def _layer_options(p: Profile, n_gpu_layers: int | str, n_cpu_moe: int | str) -> list[tuple[int, int]]:
    """(GPU layers, n_cpu_moe) from most to least wanted. A MoE model keeps every layer on the GPU and moves
    experts, the first blocks' first, to system RAM, as llama.cpp's users do (--n-cpu-moe): attention and the
    KV cache stay on the card, and a token reads only the experts its router picks. Only when not even that
    fits do whole layers leave the GPU."""
    all_layers = p.n_layer + 1
    layers = ([all_layers if n_gpu_layers < 0 else min(n_gpu_layers, all_layers)] if n_gpu_layers != "auto"
              else list(range(all_layers, -1, -1)))
    if not p.n_expert:
        return [(n, 0) for n in layers]
    if n_cpu_moe != "auto":
        return [(n, min(int(n_cpu_moe), p.n_layer)) for n in layers]
    return [(layers[0], m) for m in range(p.n_layer + 1)] + [(n, 0) for n in layers[1:]]


def plan_profile(p: Profile, vram_bytes: int | None, budget_source: str = "", *,
                 n_gpu_layers: int | str = "auto", n_ctx: int | str = "auto", kv_cache_type: str = "auto",
                 flash_attn: bool | str = "auto", min_ctx: int = 4096, n_cpu_moe: int | str = "auto") -> Plan:
    """Plan with a known budget; vram_bytes None = CPU only, budget_source then says why."""
    for name, value in (("n_gpu_layers", n_gpu_layers), ("n_ctx", n_ctx), ("kv_cache_type", kv_cache_type),
                        ("flash_attn", flash_attn), ("n_cpu_moe", n_cpu_moe)):
        _check(name, value)
    if kv_cache_type == "q8_0" and flash_attn is False:
        raise ConfigError("kv_cache_type q8_0 needs flash_attn (llama.cpp quantizes the V cache only "
                         "with it): set flash_attn: true or kv_cache_type: f16")
    if vram_bytes is None:
        _, ctx, kv, fa, _ = next(_candidates(p, [(0, 0)], n_ctx, min_ctx, kv_cache_type, flash_attn))
        ignored = ([f"n_gpu_layers {n_gpu_layers} ignored: nothing to offload to"]
                   if n_gpu_layers not in ("auto", 0) else [])
        return _make_plan(p, 0, ctx, kv, fa, None, "",
                          [budget_source or "CPU only: no GPU offload in this llama.cpp build", *ignored])
    layers = _layer_options(p, n_gpu_layers, n_cpu_moe)
    cands = list(_candidates(p, layers, n_ctx, min_ctx, kv_cache_type, flash_attn))
    usable = _usable(vram_bytes)
    chosen = next((c for c in cands if sum(estimate(p, *c).values()) <= usable), None)
    notes = []
    if chosen is None:
        chosen = cands[-1]
        notes.append(f"may not fit: even this needs more than the {usable / MiB:,.0f} MiB usable; "
                     "free GPU memory or lower the fixed settings")
    n, ctx, kv, fa, moe = chosen
    if kv == "q8_0" and kv_cache_type == "auto":
        notes.append("KV cache q8_0: an f16 cache of this context does not fit; decode ~12% slower "
                     "(docs/measurements.md, an H100: 202 vs 229 tok/s)")
    if n_cpu_moe not in ("auto", 0) and not p.n_expert:
        notes.append(f"n_cpu_moe {n_cpu_moe} ignored: {p.name} has no experts")
    return _make_plan(p, n, ctx, kv, fa, vram_bytes, budget_source, notes, moe)


def plan(model_path: str | Path | Profile, *, vram_bytes: int | None = None, n_gpu_layers: int | str = "auto",
         n_ctx: int | str = "auto", kv_cache_type: str = "auto", flash_attn: bool | str = "auto",
         min_ctx: int = 4096, n_cpu_moe: int | str = "auto") -> Plan:
    """Plan for a GGUF file, a catalog name, or a profile already read. vram_bytes None: ask the GPU."""
    profile = model_path if isinstance(model_path, Profile) else load_profile(model_path)
    source = "given"
    if vram_bytes is None:
        probed = _probe_vram()
        vram_bytes, source = probed if probed else (None, _no_gpu_reason())
    return plan_profile(profile, vram_bytes, source, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                        kv_cache_type=kv_cache_type, flash_attn=flash_attn, min_ctx=min_ctx, n_cpu_moe=n_cpu_moe)


def fewer_layers(p: Plan) -> Plan | None:
    """The plan to try after a CUDA out-of-memory at load: enough less on the GPU to free ~5% of VRAM; a MoE
    model moves more blocks' experts to system RAM before it gives up a layer."""
    if p.n_gpu_layers == 0 or p.profile is None or p.vram_budget_bytes is None:
        return None
    target = p.estimated_vram_bytes - max(MARGIN_MIN, int(p.estimated_vram_bytes * MARGIN_SHARE))

    def fits(n: int, moe: int) -> bool:
        return sum(estimate(p.profile, n, p.n_ctx, p.kv_cache_type, p.flash_attn, moe).values()) <= target

    if p.profile.n_expert and p.n_cpu_moe < p.n_layer:
        moe = p.n_cpu_moe + 1
        while moe < p.n_layer and not fits(p.n_gpu_layers, moe):
            moe += 1
        return _make_plan(p.profile, p.n_gpu_layers, p.n_ctx, p.kv_cache_type, p.flash_attn, p.vram_budget_bytes,
                          p.budget_source, [f"out of memory with the experts of {p.n_cpu_moe} blocks in system "
                                            f"RAM: retrying with {moe}"], moe)
    n = p.n_gpu_layers - 1
    while n > 0 and not fits(n, p.n_cpu_moe):
        n -= 1
    return _make_plan(p.profile, n, p.n_ctx, p.kv_cache_type, p.flash_attn, p.vram_budget_bytes,
                      p.budget_source, [f"out of memory with {p.n_gpu_layers} GPU layers: retrying with {n}"],
                      p.n_cpu_moe)


# ---- free VRAM ---------------------------------------------------------------------------------------

def _ggml_memory(llama_cpp) -> tuple[int, int] | None:
    """(free, total) bytes of the first GPU, llama.cpp's main_gpu, as its ggml device API reports them."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = [n for n in ("libggml.so", "libggml.dylib", "ggml.dll") if (lib_dir / n).exists()]
    if not names:
        return None
    ggml = ctypes.CDLL(str(lib_dir / names[0]))  # already loaded by llama_cpp: same device registry
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_size_t)] * 2
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) in GGML_GPU_DEVICE_TYPES:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            return free.value, total.value
    return None


def _ggml_free_vram(llama_cpp) -> int | None:
    memory = _ggml_memory(llama_cpp)
    return memory[0] if memory else None


def _torch_free_vram(_llama_cpp) -> int | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch
    return torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else None


def _nvidia_smi_free_vram(_llama_cpp) -> int | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20)
    first = out.stdout.strip().splitlines()[:1]
    return int(first[0]) * MiB if out.returncode == 0 and first and first[0].isdigit() else None


_VRAM_PROBES = (("llama.cpp's ggml device API", _ggml_free_vram),
                ("torch.cuda.mem_get_info", _torch_free_vram), ("nvidia-smi", _nvidia_smi_free_vram))


def _probe_vram() -> tuple[int, str] | None:
    llama_cpp = _llama_cpp()
    if llama_cpp is None or not llama_cpp.llama_supports_gpu_offload():
        return None
    for name, probe in _VRAM_PROBES:
        free = probe(llama_cpp)
        if free is not None:
            return free, f"free VRAM from {name}"
    return None


def _no_gpu_reason() -> str:
    llama_cpp = _llama_cpp()
    if llama_cpp is not None and llama_cpp.llama_supports_gpu_offload():
        return ("CPU only: llama.cpp can offload but no free-VRAM figure was found; "
                "give one with --vram-gb (or vram_bytes)")
    return "CPU only: this llama-cpp-python has no GPU offload; for a CUDA build: scripts/setup.sh --cuda"


def gpu_offload() -> bool:
    """Whether this llama.cpp build can offload to a GPU (not whether a GPU is there)."""
    llama_cpp = _llama_cpp()
    return llama_cpp is not None and bool(llama_cpp.llama_supports_gpu_offload())


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes of the first GPU, whoever uses it; None without GPU offload."""
    llama_cpp = _llama_cpp()
    if not gpu_offload():
        return None
    memory = _ggml_memory(llama_cpp)
    return (memory[1] - memory[0], memory[1]) if memory else None


def free_vram_bytes() -> int | None:
    """Free memory of the first GPU; None when llama.cpp has no GPU offload."""
    probed = _probe_vram()
    return probed[0] if probed else None


# ---- CLI ---------------------------------------------------------------------------------------------

def _given_budget_note(p: Profile, budget: int, min_ctx: int) -> str:
    """What --vram-gb assumes, and the plan with a desktop on the same card."""
    shared = plan_profile(p, budget - DESKTOP_SHARE, min_ctx=min_ctx)
    return (f"--vram-gb plans for {budget / GiB:g} GiB free: a card with nothing else on it. A desktop on the same "
            f"card commonly holds 0.3-1 GiB; with {(budget - DESKTOP_SHARE) / GiB:g} GiB free this becomes "
            f"{shared.n_gpu_layers} of {shared.n_layer + 1} layers on the GPU"
            f"{f' with the experts of {shared.n_cpu_moe} blocks in RAM' if shared.n_cpu_moe else ''} and "
            f"{shared.n_ctx} context. "
            "`nvidia-smi` shows what is free; without --vram-gb the miner plans with what is free when it starts")


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help=f"a .gguf path or a catalog name ({', '.join(catalog.MODELS)}); "
                                    "default: the embedded demo model")
    ap.add_argument("--quant", default="Q4_K_M", help="for catalog names: Q4_K_M (default) or Q4_0")
    ap.add_argument("--vram-gb", type=float,
                    help="plan for this much free VRAM (GiB) instead of asking the GPU")
    ap.add_argument("--min-ctx", type=int, default=4096, help="smallest acceptable context (default 4096)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_for(args: argparse.Namespace) -> Plan:
    """The plan for `fit`'s arguments: a GGUF file or a catalog name, at --vram-gb or what the GPU has free."""
    if args.model is None:
        from models.embedded import embedded_model_path
        args.model = str(embedded_model_path())
    profile = load_profile(args.model, args.quant)
    if args.vram_gb is not None:
        budget, source = int(args.vram_gb * GiB), f"--vram-gb {args.vram_gb:g}"
    else:
        budget, source = _probe_vram() or (None, _no_gpu_reason())
    result = plan_profile(profile, budget, source, min_ctx=args.min_ctx)
    if args.vram_gb is not None:
        result = dataclasses.replace(result, notes=result.notes + [_given_budget_note(profile, budget, args.min_ctx)])
    return result
