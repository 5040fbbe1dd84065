"""The supported production models: where their Q4 GGUF files live, their shapes, and size estimates;
and `load_profile`, what VRAM planning needs to know about a model (from a GGUF file or the catalog).

Sizes come from the hub pages of the GGUF repos (see `Quant.size_source`). Exact byte counts are only
written where the LFS pointer was seen; elsewhere the rounded figure the hub shows is kept and said so.
The download checks every file against the hub's own metadata, so these figures are for display and
for planning before a file exists (`fit --model NAME`), never for verification.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelError, UnknownModelError, UnloadableModelError
from models.gguf_header import Header, read_header
from models.loadable import why_unloadable

GB = 10**9  # the hub shows decimal gigabytes


@dataclass(frozen=True)
class Shape:
    """Transformer hyper-parameters, as in the original config.json / GGUF metadata."""
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ff: int                 # per expert for MoE models
    context_length: int       # the GGUF's <arch>.context_length
    n_expert: int = 0
    n_expert_used: int = 0
    qkv_bias: bool = False
    tied_embeddings: bool = False


@dataclass(frozen=True)
class Quant:
    quant: str                # llama.cpp file type name, e.g. "Q4_K_M"
    repo: str                 # Hugging Face repo holding the GGUF
    files: tuple[str, ...]    # every part of a split GGUF, first part first
    total_bytes: int          # all parts together
    size_source: str          # where total_bytes comes from; "estimate" = not confirmed on the hub


@dataclass(frozen=True)
class ModelEntry:
    name: str                 # short name for the CLI
    display_name: str
    arch: str                 # GGUF general.architecture
    chat_format: str          # llama-cpp-python chat_format (the GGUF also embeds its template)
    source_repo: str          # original checkpoint, for `storynet-miner convert`
    source_gated: bool        # the original repo needs a login and an accepted license
    license: str
    shape: Shape
    quants: tuple[Quant, ...]

    def quant(self, name: str) -> Quant:
        for q in self.quants:
            if q.quant.upper() == name.upper():
                return q
        have = ", ".join(q.quant for q in self.quants)
        raise UnknownModelError(f"{self.name}: no {name} file in the catalog; choose one of: {have}")


_LLAMA_8B = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
_LLAMA_70B = "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF"
_QWEN_7B = "Qwen/Qwen2.5-7B-Instruct-GGUF"
_MIXTRAL = "mradermacher/Mixtral-8x7B-Instruct-v0.1-GGUF"

MODELS: dict[str, ModelEntry] = {m.name: m for m in (
    ModelEntry(
        "llama-3.1-8b", "Meta-Llama-3.1-8B-Instruct", "llama", "llama-3",
        "meta-llama/Llama-3.1-8B-Instruct", True, "llama3.1",
        Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_vocab=128256,
              n_ff=14336, context_length=131072),
        (Quant("Q4_K_M", _LLAMA_8B, ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",), 4_920_733_536,
               "LFS pointer (exact)"),
         # bartowski's naming; not among the hub pages searched: name unconfirmed, size from the shapes.
         Quant("Q4_0", _LLAMA_8B, ("Meta-Llama-3.1-8B-Instruct-Q4_0.gguf",), int(4.66 * GB),
               "estimate"))),
    ModelEntry(
        "llama-3.1-70b", "Meta-Llama-3.1-70B-Instruct", "llama", "llama-3",
        "meta-llama/Llama-3.1-70B-Instruct", True, "llama3.1",
        Shape(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, head_dim=128, n_vocab=128256,
              n_ff=28672, context_length=131072),
        (Quant("Q4_K_M", _LLAMA_70B, ("Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf",), int(42.5 * GB),
               "hub file page, rounded to 0.1 GB"),
         Quant("Q4_0", _LLAMA_70B, ("Meta-Llama-3.1-70B-Instruct-Q4_0.gguf",), int(40.0 * GB),  # as 8B Q4_0
               "estimate"))),
    ModelEntry(
        "qwen2.5-7b", "Qwen2.5-7B-Instruct", "qwen2", "chatml",
        "Qwen/Qwen2.5-7B-Instruct", False, "apache-2.0",
        Shape(n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, head_dim=128, n_vocab=152064,
              n_ff=18944, context_length=32768, qkv_bias=True),
        # Qwen's own repo splits each quant in parts; the part sizes were not confirmed, nor the Q4_0 names.
        # The Q4_K_M total is the single-file Q4_K_M of the same model on bartowski's hub page (4.68 GB).
        (Quant("Q4_K_M", _QWEN_7B, ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
                                    "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf"),
               int(4.68 * GB), "hub file page (bartowski's single file), rounded to 0.01 GB"),
         Quant("Q4_0", _QWEN_7B, ("qwen2.5-7b-instruct-q4_0-00001-of-00002.gguf",
                                  "qwen2.5-7b-instruct-q4_0-00002-of-00002.gguf"),
               int(4.43 * GB), "estimate"))),
    ModelEntry(
        "mixtral-8x7b", "Mixtral-8x7B-Instruct-v0.1", "llama", "mistral-instruct",
        "mistralai/Mixtral-8x7B-Instruct-v0.1", True, "apache-2.0",
        Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_vocab=32000,
              n_ff=14336, context_length=32768, n_expert=8, n_expert_used=2),
        # Not TheBloke's (Dec 2023): they store one tensor per expert, which this llama.cpp cannot load
        # (models/loadable.py). mradermacher's names follow its Q2_K file (linked in an issue); its Q4_K_M was
        # not seen, so its size is that of two later conversions of these shapes on the hub (mradermacher's
        # Mixtral-8x7B-v0.1 Q4_K_M, gobean's Instruct q4-k-m: 28.4 GB each). mradermacher makes no Q4_0: it comes
        # from gobean's repo, its page seen at 26.4 GB. download reads each file's header before fetching it.
        (Quant("Q4_K_M", _MIXTRAL, ("Mixtral-8x7B-Instruct-v0.1.Q4_K_M.gguf",), int(28.4 * GB),
               "hub file pages of the same shapes, rounded to 0.1 GB"),
         Quant("Q4_0", "gobean/Mixtral-8x7B-Instruct-v0.1-GGUF", ("Mixtral-8x7B-Instruct-v0.1-q4-0.gguf",),
               int(26.4 * GB), "hub file page, rounded to 0.1 GB"))))}


def get(name: str) -> ModelEntry:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


# ---- size of each part of a quantized model, from its shape ----------------------------------------

# ggml block layouts: (elements per block, bytes per block)
_GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q8_0": (32, 34),
                "Q4_K": (256, 144), "Q6_K": (256, 210)}

# llama.cpp's quantization mixes: the base type, the output (lm_head) type, and the type given to
# attn_v / ffn_down in the layers llama.cpp treats as sensitive (first and last eighth, every third).
MIXES = {"Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"), "Q4_0": ("Q4_0", "Q6_K", None)}


def tensor_bytes(n_elements: int, ggml_type: str) -> int:
    per_block, block_bytes = _GGML_BLOCKS[ggml_type]
    return n_elements // per_block * block_bytes


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Layout:
    """Bytes of a quantized model by where llama.cpp places them."""
    input_bytes: int                 # token embeddings: always stay in system RAM
    block_bytes: tuple[int, ...]     # one entry per repeating block
    expert_bytes: tuple[int, ...]    # the part of each block in MoE expert tensors
    output_bytes: int                # output norm + lm_head: the "+1" layer of n_gpu_layers

    @property
    def total(self) -> int:
        return self.input_bytes + sum(self.block_bytes) + self.output_bytes


def estimate_layout(shape: Shape, quant: str) -> Layout:
    """The tensor bytes llama-quantize would write for `quant` (metadata excluded, < 0.2%)."""
    base, out_type, bumped = MIXES[quant.upper()]
    s = shape
    embd = s.n_vocab * s.n_embd
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    experts = max(s.n_expert, 1)
    blocks, expert_part = [], []
    for i in range(s.n_layer):
        more = bumped is not None and more_bits(i, s.n_layer)
        # llama.cpp keeps attn_v of 8-expert models at Q8_0 ("trades just ~128MB")
        v_type = "Q8_0" if s.n_expert == 8 else (bumped if more else base)
        down_type = bumped if more else base
        ffn = s.n_embd * s.n_ff * experts
        b_experts = tensor_bytes(2 * ffn, base) + tensor_bytes(ffn, down_type)
        b = (tensor_bytes(s.n_embd * (2 * q_dim + kv_dim), base) + tensor_bytes(s.n_embd * kv_dim, v_type)
             + b_experts + 2 * s.n_embd * 4                        # attn_norm, ffn_norm (F32)
             + (s.n_embd * s.n_expert * 4)                         # MoE router (F32)
             + ((q_dim + 2 * kv_dim) * 4 if s.qkv_bias else 0))    # Qwen2 q/k/v biases (F32)
        blocks.append(b)
        expert_part.append(b_experts if s.n_expert else 0)
    # tied embeddings: llama-quantize gives token_embd the output type and llama.cpp loads a copy of
    # it as the output layer
    input_bytes = tensor_bytes(embd, out_type if s.tied_embeddings else base)
    output = s.n_embd * 4 + tensor_bytes(embd, out_type)
    return Layout(input_bytes, tuple(blocks), tuple(expert_part), output)


# ---- profiles: what VRAM planning needs to know about one model ------------------------------------

_BLOCK = re.compile(r"blk\.(\d+)\.")
_EXPERT = re.compile(r"ffn_(gate|up|down)_exps\.")  # one tensor per expert is refused first (models/loadable.py)


@dataclass(frozen=True)
class Profile:
    """What planning needs to know about one quantized model."""
    name: str
    n_layer: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    layout: Layout
    n_expert: int = 0
    n_expert_used: int = 0
    has_chat_template: bool = True  # catalog models are all Instruct models


def load_profile(model: str | Path, quant: str = "Q4_K_M") -> Profile:
    """A GGUF file (any part of a split one), or a catalog name planned from its shapes alone."""
    path = Path(model)
    if path.is_file():
        return _profile_from_gguf(path)
    if str(model).lower() in MODELS:
        entry = get(str(model))
        q, s = entry.quant(quant), entry.shape
        return Profile(f"{entry.name} {q.quant} (catalog shapes)", s.n_layer, s.context_length, s.n_head,
                       s.n_head_kv, s.head_dim, s.head_dim, s.n_vocab,
                       estimate_layout(s, q.quant),
                       s.n_expert, s.n_expert_used)
    raise ModelError(f"{model}: no such GGUF file and not a catalog name ({', '.join(MODELS)}); "
                            "download one with: .venv/bin/storynet-miner download NAME")


def _gguf_parts(path: Path) -> list[Path]:
    m = re.fullmatch(r"(.*)-\d{5}-of-(\d{5})\.gguf", path.name)
    if not m:
        return [path]
    parts = [path.with_name(f"{m[1]}-{i:05d}-of-{m[2]}.gguf") for i in range(1, int(m[2]) + 1)]
    for part in parts:
        if not part.is_file():
            raise ModelError(f"{part}: this part of the split model is missing; download every "
                             "part with `.venv/bin/storynet-miner download NAME`")
    return parts


def _profile_from_gguf(path: Path) -> Profile:
    try:
        headers = [read_header(p) for p in _gguf_parts(path)]
    except ValueError as e:  # not GGUF, or cut short
        raise ModelError(f"{path}: not a readable GGUF file ({e}); it may be corrupt or half-downloaded: "
                         f"download it again") from None
    tensors = [t for h in headers for t in h.tensors]
    if reason := why_unloadable(Header(headers[0].metadata, tuple(tensors)), str(path)):
        raise UnloadableModelError(reason)
    fields = headers[0].metadata
    meta = fields.get

    arch = meta("general.architecture")
    if f"{arch}.block_count" not in fields:
        raise ModelError(f"{path}: no {arch}.block_count metadata; is it a llama.cpp GGUF?")
    n_layer, n_embd = int(meta(f"{arch}.block_count")), int(meta(f"{arch}.embedding_length"))
    n_head = int(meta(f"{arch}.attention.head_count"))
    n_head_kv = meta(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = max(n_head_kv) if isinstance(n_head_kv, list) else int(n_head_kv)  # per layer: the widest
    key_len = int(meta(f"{arch}.attention.key_length", n_embd // n_head))
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = meta(f"{arch}.vocab_size") or (int(embd.shape[-1]) if embd is not None else
                                             len(fields["tokenizer.ggml.tokens"]))
    return Profile(path.name, n_layer, int(meta(f"{arch}.context_length", 4096)), n_head, n_head_kv, key_len,
                   int(meta(f"{arch}.attention.value_length", key_len)), int(n_vocab),
                   _layout(tensors, n_layer), int(meta(f"{arch}.expert_count", 0)),
                   int(meta(f"{arch}.expert_used_count", 0)), "tokenizer.chat_template" in fields)


def _layout(tensors: list, n_layer: int) -> Layout:
    blocks, experts = [0] * n_layer, [0] * n_layer
    embd = other = 0
    tied = True
    for t in tensors:
        size = int(t.n_bytes)
        if m := _BLOCK.match(t.name):
            blocks[int(m[1])] += size
            experts[int(m[1])] += size if _EXPERT.search(t.name) else 0
        elif t.name == "token_embd.weight":
            embd += size
        else:  # output, output_norm, rope factors: loaded with the output layer
            other += size
            tied = tied and t.name != "output.weight"
    # tied embeddings: llama.cpp loads a copy of token_embd as the output layer
    return Layout(embd, tuple(blocks), tuple(experts), other + (embd if tied else 0))
