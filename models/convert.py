"""Convert a Hugging Face checkpoint (llama, qwen2, mixtral) to GGUF, then quantize it with llama.cpp.

Tensors are streamed: the GGUF header is written from the checkpoint's shapes alone, then each tensor
is read, reshaped for llama.cpp and written before the next one is read, so a 16 GB model is never
held in memory twice. The quantizer is llama.cpp's own (`llama_model_quantize`).
"""

from __future__ import annotations

# llama_cpp first (models.quantize uses it): loading it after numpy has crashed llama.cpp on some machines.
import llama_cpp  # noqa: F401  # isort: skip

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from models.quantize import QuantizeError, quantize
from models.tokenizer_gguf import VOCAB_WRITERS, ConversionError

log = logging.getLogger(__name__)
T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: gguf.MODEL_ARCH
    vocab: str  # key of tokenizer_gguf.VOCAB_WRITERS
    pre: str  # llama.cpp pre-tokenizer name for a BPE vocabulary
    permute_qk: bool  # HF rotates half-split heads; llama.cpp's llama graph wants interleaved pairs


# Mixtral is llama.cpp's llama architecture with experts.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, "bpe", "llama-bpe", True),
    "mixtral": ArchSpec(gguf.MODEL_ARCH.LLAMA, "spm", "default", True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, "bpe", "qwen2", False),
}


@dataclass(frozen=True)
class OutType:
    ftype: gguf.LlamaFileType
    torch_dtype: torch.dtype
    ggml_type: gguf.GGMLQuantizationType


OUTTYPES: dict[str, OutType] = {
    "f32": OutType(gguf.LlamaFileType.ALL_F32, torch.float32, gguf.GGMLQuantizationType.F32),
    "f16": OutType(gguf.LlamaFileType.MOSTLY_F16, torch.float16, gguf.GGMLQuantizationType.F16),
    "bf16": OutType(gguf.LlamaFileType.MOSTLY_BF16, torch.bfloat16, gguf.GGMLQuantizationType.BF16),
}

# llama.cpp file type, and bytes per weight to plan disk space (K-quants keep some tensors wider).
QUANTS: dict[str, float] = {"Q4_K_M": 0.62, "Q4_0": 0.57, "Q8_0": 1.07, "none": 0.0}  # bytes a weight

# config.json key -> GGUFWriter method; the first group must be present.
REQUIRED_HPARAMS = (
    ("max_position_embeddings", "add_context_length"),
    ("hidden_size", "add_embedding_length"),
    ("num_hidden_layers", "add_block_count"),
    ("intermediate_size", "add_feed_forward_length"),
    ("num_attention_heads", "add_head_count"),
    ("rms_norm_eps", "add_layer_norm_rms_eps"),
    ("vocab_size", "add_vocab_size"),
)
OPTIONAL_HPARAMS = (
    ("num_local_experts", "add_expert_count"),
    ("num_experts_per_tok", "add_expert_used_count"),
)

SKIPPED = re.compile(r".*\.rotary_emb\.inv_freq")  # a buffer older checkpoints saved; llama.cpp computes it
LEGACY_EXPERT = re.compile(
    r"model\.layers\.(?P<bid>\d+)\.block_sparse_moe\.experts\.(?P<xid>\d+)\.(?P<w>w[123])\.weight")
FUSED_EXPERT = re.compile(r"model\.layers\.(?P<bid>\d+)\.mlp\.experts\.(?P<w>gate_up_proj|down_proj)")
LEGACY_EXPERT_KIND = {"w1": T.FFN_GATE_EXP, "w2": T.FFN_DOWN_EXP, "w3": T.FFN_UP_EXP}
KEEP_F32 = {T.FFN_GATE_INP, T.ROPE_FREQS}  # small tensors llama.cpp reads at full precision
SPACE_MARGIN = 64 * 2**20
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: its name, shape, and how to read it from the checkpoint when its turn comes."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    kind: gguf.MODEL_TENSOR


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    arch: str
    outtype: str
    quant: str
    n_tensors: int
    size_bytes: int


class Checkpoint:
    """The tensors of a checkpoint directory by name; each one is read only when asked for."""

    def __init__(self, model_dir: Path) -> None:
        self._tensors: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
        files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"{model_dir} holds no model*.safetensors or pytorch_model*.bin weights; "
                                  "save the model with save_pretrained() or download the full repository")
        for path in files:
            opener = self._open_safetensors if path.suffix == ".safetensors" else self._open_torch
            opener(path)

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        for name in handle.keys():
            shape = tuple(handle.get_slice(name).get_shape())
            self._tensors[name] = (shape, partial(handle.get_tensor, name))

    def _open_torch(self, path: Path) -> None:
        # mmap keeps the weights on disk until each tensor is touched.
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state.items():
            self._tensors[name] = (tuple(tensor.shape), partial(state.__getitem__, name))

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][0]

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name][1]()


def rope_interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows of each head from HF's two rotary halves to llama.cpp's interleaved pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama-3.1's rope scaling, the rope_freqs tensor llama.cpp reads."""
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen > old_ctx / low, torch.full_like(wavelen, factor), blended)
    return torch.where(wavelen < old_ctx / high, torch.ones_like(wavelen), factors).float()


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """rope theta and scaling; transformers 5 saves them together as rope_parameters."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return float(theta), rope


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def no_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any], config: dict[str, Any]) -> list[TensorJob]:
    return []


def linear_rope(writer: gguf.GGUFWriter, rope: dict[str, Any], config: dict[str, Any]) -> list[TensorJob]:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    return []


def llama3_rope(writer: gguf.GGUFWriter, rope: dict[str, Any], config: dict[str, Any]) -> list[TensorJob]:
    factors = llama3_rope_factors(rope, rope_settings(config)[0], head_dim(config))
    name = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"
    return [TensorJob(name, tuple(factors.shape), lambda: factors, T.ROPE_FREQS)]


# Each rope scaling writes its metadata now and returns the tensors it needs written with the weights.
ROPE_SCALINGS: dict[str, Callable[[gguf.GGUFWriter, dict[str, Any], dict[str, Any]], list[TensorJob]]] = {
    "default": no_rope_scaling,
    "linear": linear_rope,
    "llama3": llama3_rope,
}


def add_rope_scaling(writer: gguf.GGUFWriter, config: dict[str, Any]) -> list[TensorJob]:
    rope = rope_settings(config)[1]
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_SCALINGS:
        raise ConversionError(f"config.json: rope scaling {kind!r} is not supported; "
                              f"supported: {', '.join(ROPE_SCALINGS)}")
    return ROPE_SCALINGS[kind](writer, rope, config)


def stack_experts(ckpt: Checkpoint, names: list[str]) -> torch.Tensor:
    return torch.stack([ckpt.load(n) for n in names])


def fused_half(ckpt: Checkpoint, name: str, index: int) -> torch.Tensor:
    return ckpt.load(name).chunk(2, dim=1)[index]  # transformers' gate_up_proj is [gate; up] per expert


def expert_name(kind: gguf.MODEL_TENSOR, bid: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def legacy_expert_jobs(ckpt: Checkpoint, names: list[str]) -> list[TensorJob]:
    """Stack Mixtral's per-expert w1/w2/w3 matrices into one 3-D tensor per layer and kind."""
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for name in names:
        if m := LEGACY_EXPERT.fullmatch(name):
            groups.setdefault((int(m["bid"]), m["w"]), {})[int(m["xid"])] = name
    jobs = []
    for (bid, w), members in sorted(groups.items()):
        ordered = [members[x] for x in sorted(members)]
        shape = (len(ordered), *ckpt.shape(ordered[0]))
        kind = LEGACY_EXPERT_KIND[w]
        jobs.append(TensorJob(expert_name(kind, bid), shape, partial(stack_experts, ckpt, ordered), kind))
    return jobs


def fused_expert_jobs(ckpt: Checkpoint, names: list[str]) -> list[TensorJob]:
    """Split transformers 5's fused gate_up_proj in two; down_proj is already llama.cpp's layout."""
    jobs = []
    for name in names:
        if (m := FUSED_EXPERT.fullmatch(name)) is None:
            continue
        bid, shape = int(m["bid"]), ckpt.shape(name)
        if m["w"] == "down_proj":
            jobs.append(TensorJob(expert_name(T.FFN_DOWN_EXP, bid), shape, partial(ckpt.load, name), T.FFN_DOWN_EXP))
            continue
        half = (shape[0], shape[1] // 2, shape[2])
        for index, kind in enumerate((T.FFN_GATE_EXP, T.FFN_UP_EXP)):
            jobs.append(TensorJob(expert_name(kind, bid), half, partial(fused_half, ckpt, name, index), kind))
    return jobs


def load_interleaved(ckpt: Checkpoint, name: str, n_head: int) -> torch.Tensor:
    return rope_interleave(ckpt.load(name), n_head)


def plain_job(ckpt: Checkpoint, name: str, spec: ArchSpec, config: dict[str, Any],
              tmap: gguf.TensorNameMap) -> TensorJob:
    found = tmap.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ConversionError(f"tensor {name!r} has no llama.cpp counterpart in {spec.gguf_arch.name.lower()}; "
                              "the checkpoint does not match its config.json architecture")
    kind, gguf_name = found
    n_head = config["num_attention_heads"]
    heads = {T.ATTN_Q: n_head, T.ATTN_K: config.get("num_key_value_heads") or n_head}
    load = partial(ckpt.load, name)
    if spec.permute_qk and kind in heads:
        load = partial(load_interleaved, ckpt, name, heads[kind])
    return TensorJob(gguf_name, ckpt.shape(name), load, kind)


def plan_tensors(ckpt: Checkpoint, spec: ArchSpec, config: dict[str, Any]) -> list[TensorJob]:
    tmap = gguf.get_tensor_name_map(spec.gguf_arch, config["num_hidden_layers"])
    names = [n for n in ckpt.names if not SKIPPED.fullmatch(n)]
    plain = [n for n in names if not (LEGACY_EXPERT.fullmatch(n) or FUSED_EXPERT.fullmatch(n))]
    jobs = [plain_job(ckpt, n, spec, config, tmap) for n in plain]
    return jobs + legacy_expert_jobs(ckpt, names) + fused_expert_jobs(ckpt, names)


def stored_type(job: TensorJob, outtype: OutType) -> OutType:
    return OUTTYPES["f32"] if len(job.shape) == 1 or job.kind in KEEP_F32 else outtype


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], name: str, ftype: gguf.LlamaFileType) -> None:
    missing = [key for key, _ in REQUIRED_HPARAMS if key not in config]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}; it is not a complete checkpoint config")
    present = REQUIRED_HPARAMS + tuple(p for p in OPTIONAL_HPARAMS if config.get(p[0]) is not None)
    for key, method in present:
        getattr(writer, method)(config[key])
    writer.add_name(name)
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(rope_settings(config)[0])
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_file_type(ftype)


def write_gguf(source: SourceModel, outtype: OutType, dest: Path, quant_bpw: float) -> int:
    """Write the unquantized GGUF file once it and the quantized one are known to fit; returns the tensor count."""
    spec, config = source.spec, source.config
    ckpt = Checkpoint(source.model_dir)
    writer = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
    add_hparams(writer, config, source.name, outtype.ftype)
    jobs = plan_tensors(ckpt, spec, config) + add_rope_scaling(writer, config)
    VOCAB_WRITERS[spec.vocab](writer, source.model_dir, spec.pre, config["vocab_size"])
    n_weights = [math.prod(job.shape) for job in jobs]
    n_bytes = [n * stored_type(job, outtype).torch_dtype.itemsize for n, job in zip(n_weights, jobs)]
    ensure_space(dest, sum(n_bytes) + int(sum(n_weights) * quant_bpw))
    for job, size in zip(jobs, n_bytes):
        # Any dtype but uint8 tells the writer that the shape counts elements, not bytes.
        writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), size, stored_type(job, outtype).ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, job in enumerate(jobs, start=1):
        data = job.load().to(stored_type(job, outtype).torch_dtype).contiguous()
        writer.write_tensor_data(data.reshape(-1).view(torch.uint8).numpy())
        log.debug("[%d/%d] %s %s %s", i, len(jobs), job.name, list(job.shape), data.dtype)
    writer.close()
    return len(jobs)


def ensure_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if free < needed + SPACE_MARGIN:
        raise ConversionError(f"not enough free space for {dest}: about {needed / 2**30:.2f} GiB needed, "
                              f"{free / 2**30:.2f} GiB free in {dest.parent}; "
                              "free space or pass --out on a larger disk")


@dataclass(frozen=True)
class SourceModel:
    """A checkpoint directory whose config.json names a supported architecture."""

    model_dir: Path
    name: str
    config: dict[str, Any]
    arch: str
    spec: ArchSpec


def open_source(source: str) -> SourceModel:
    model_dir = locate(source)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} is missing; SOURCE must be a Hugging Face checkpoint directory "
                              "(what save_pretrained() writes) or a repo id")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    arch = config.get("model_type")
    if arch not in ARCHS:
        classes = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ConversionError(f"{config_path}: architecture {arch!r} ({classes}) is not supported; "
                              f"supported: {', '.join(sorted(ARCHS))}")
    return SourceModel(model_dir, Path(source.rstrip("/")).name, config, arch, ARCHS[arch])


def locate(source: str) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded into the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not REPO_ID.fullmatch(source):
        raise ConversionError(f"{path} is not a checkpoint directory; pass a directory holding config.json and "
                              "the weights, or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct")
    return download(source)


def download(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HTTPError

    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        files = list_repo_files(repo_id)
        weights = "model*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
        patterns = [weights, "*.json", "tokenizer.model", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError, HTTPError) as exc:  # no network, unknown or gated repo, bad id
        raise ConversionError(f"could not download {repo_id!r} ({exc}); no local directory of that name exists "
                              "either. Check the repo id, run `hf auth login` for a gated model, "
                              "or pass a local checkpoint directory") from exc


def check_choice(what: str, value: str, choices: dict[str, Any]) -> None:
    if value not in choices:
        raise ConversionError(f"--{what} {value!r} is not one of: {', '.join(choices)}")


def convert(source: str | Path, *, quant: str = "Q4_K_M", outtype: str = "f16",
            out: str | Path | None = None) -> ConversionResult:
    """Convert SOURCE (checkpoint directory or repo id) to a GGUF file, quantized unless quant is 'none'."""
    check_choice("quant", quant, QUANTS)
    check_choice("outtype", outtype, OUTTYPES)
    model = open_source(str(source))
    label = outtype if quant == "none" else quant
    dest = Path(out) if out else Path.cwd() / f"{model.name}-{label}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Half-written files keep a .part suffix so a failed run never leaves something that looks usable.
    part = dest.with_name(dest.name + ".part")
    plain = part if quant == "none" else dest.with_name(f"{dest.name}.{outtype}.part")
    try:
        log.info("writing %s %s GGUF of %s", model.arch, outtype, model.model_dir)
        n_tensors = write_gguf(model, OUTTYPES[outtype], plain, QUANTS[quant])
        if quant != "none":
            log.info("quantizing to %s with llama.cpp", quant)
            try:
                quantize(plain, part, quant)
            except QuantizeError as e:
                raise ConversionError(f"{e}; try --quant Q8_0 or --quant none") from None
        part.replace(dest)
    finally:
        plain.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return ConversionResult(dest, model.arch, outtype, quant, n_tensors, dest.stat().st_size)
