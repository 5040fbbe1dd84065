"""Every low-level llama.cpp call the local backend makes, in one module (llama-cpp-python 0.3.36 names).

Why not `llama_cpp.Llama`: it cannot set n_seq_max or choose how the KV cache is split between sequences,
so it decodes one sequence at a time (docs/engine.md, "llama.cpp's multi-sequence API"). These wrappers
own the C objects, free them once, and turn C return codes into exceptions; nothing here knows about
requests or scheduling. Every field of a llama.cpp struct is written through set_fields, which refuses a name
the struct lacks (ctypes would keep it as a Python attribute that llama.cpp never sees).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import unicodedata
from collections import deque
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from backends.base import Dry
from backends.errors import LlamaError, NoKvRoom

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's defaults: a repeat is counted from the last of these
ALL_LAYERS = 0x7FFFFFFF  # llama.cpp clamps this to "every layer"
LOAD_MODES = {True: llama_cpp.LLAMA_LOAD_MODE_MMAP, False: llama_cpp.LLAMA_LOAD_MODE_NONE}  # mapped, or read
# One block's expert tensors, as llama.cpp's --n-cpu-moe names them (common/common.h: "blk\.%d" followed by
# LLM_FFN_EXPS_REGEX); a regex that llama.cpp searches for in each tensor's name.
EXPERTS_OF_BLOCK = r"blk\.{}\.ffn_(up|down|gate|gate_up)_(ch|)exps"
GGML_LIBRARIES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so", "libggml.dylib", "ggml.dll")
Struct = TypeVar("Struct", bound=ctypes.Structure)

# llama.cpp logs through llama-cpp-python's logger; below ERROR it is load chatter, not news.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    """The fields a ctypes struct has: its own, its bases', and those of its anonymous members."""
    names: set[str] = set()
    for klass in cls.__mro__:
        anonymous = klass.__dict__.get("_anonymous_", ())
        for name, ctype, *_ in klass.__dict__.get("_fields_", ()):
            names.add(name)
            if name in anonymous:
                names |= _field_names(ctype)
    return frozenset(names)


def set_fields(struct: Struct, **values: Any) -> Struct:
    """Write fields of a llama.cpp struct; return it. ctypes keeps any other name as a Python attribute that
    the C side never sees (in 0.3.36 `model_params.use_mmap = False` did nothing: the struct has load_mode),
    so a name the struct lacks is refused."""
    names = _field_names(type(struct))
    if not names.issuperset(values):
        unknown = ", ".join(repr(name) for name in values if name not in names)
        raise AttributeError(f"{type(struct).__name__} has no field {unknown} in llama-cpp-python "
                             f"{llama_cpp.__version__}, so llama.cpp would never see it; its fields: "
                             f"{', '.join(sorted(names))}")
    for name, value in values.items():
        setattr(struct, name, value)
    return struct


class TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h): tensors whose name the regex is found in get this
    buffer type (llama-cpp-python types the field that points at an array of them as a void pointer)."""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@functools.cache
def cpu_buffer_type() -> int:
    """ggml's CPU buffer type, from the ggml library llama_cpp loaded: llama.cpp compares an override's buffer
    type with this very pointer (and then also considers the CPU's repacking buffer types)."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in GGML_LIBRARIES:
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))  # already loaded by llama_cpp: the same singleton
            if hasattr(lib, "ggml_backend_cpu_buffer_type"):
                lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
                lib.ggml_backend_cpu_buffer_type.argtypes = []
                return lib.ggml_backend_cpu_buffer_type()
    raise LlamaError(f"no ggml library in {lib_dir} exports ggml_backend_cpu_buffer_type: cannot keep tensors in "
                     f"system RAM with this llama-cpp-python build")


def experts_in_ram(n_blocks: int) -> list[bytes]:
    """llama.cpp's --n-cpu-moe N: one pattern per block i < N, matching that block's expert tensors."""
    if n_blocks < 0:
        raise ValueError(f"n_cpu_moe must be 0 or more, got {n_blocks}")
    return [EXPERTS_OF_BLOCK.format(i).encode() for i in range(n_blocks)]


def buft_overrides(patterns: list[bytes], buft: int) -> ctypes.Array:
    """A NULL-terminated array of overrides, each pattern to buft. It points at the pattern bytes: keep both
    alive as long as llama.cpp may read them (the model's whole life)."""
    array = (TensorBuftOverride * (len(patterns) + 1))()  # zeroed: the last entry's NULL pattern ends the list
    for i, pattern in enumerate(patterns):
        set_fields(array[i], pattern=pattern, buft=buft)
    return array


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, n_gpu_layers: int, *, vocab_only: bool = False, mmap: bool = True,
                 n_cpu_moe: int = 0):
        """mmap: map the file (llama.cpp's load_mode mmap) or read it into memory (none). n_cpu_moe: keep the
        expert tensors of blocks 0..n_cpu_moe-1 in system RAM, as llama.cpp's --n-cpu-moe (the rest of those
        blocks goes where n_gpu_layers puts it)."""
        self.mmap, self.n_cpu_moe = mmap, n_cpu_moe
        self._patterns = experts_in_ram(n_cpu_moe)
        self._overrides = buft_overrides(self._patterns, cpu_buffer_type()) if self._patterns else None
        params = set_fields(llama_cpp.llama_model_default_params(),
                            n_gpu_layers=ALL_LAYERS if n_gpu_layers < 0 else n_gpu_layers, vocab_only=vocab_only,
                            load_mode=LOAD_MODES[mmap],
                            tensor_buft_overrides=ctypes.cast(self._overrides, ctypes.c_void_p).value
                            if self._overrides is not None else None)
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._dry: dict[Dry, int] = {}  # DRY samplers to clone, by settings

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:  # a long value (a chat template): ask again with room for all of it
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        return template.decode("utf-8") if template else None

    def special_token(self, which: str) -> int:
        """bos or eos; -1 when the model has none."""
        return {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](self.vocab)

    def adds_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, parse_special)
        if n < 0:  # never more tokens than bytes plus specials, but the C API says how many it needed
            room = -n
            tokens = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, parse_special)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as written in text (special tokens as their text). A buffer per call:
        ctypes releases the GIL, so a shared one would mix the pieces of threads detokenizing at once."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.piece(t) for t in tokens)

    def dry_sampler(self, dry: Dry) -> int:
        """A new DRY sampler with these settings, with no history. Made once per settings and cloned after:
        making one reads every token of the vocabulary for the sequence breakers (48 ms at 128k tokens on
        2 cores), which would hold up the engine's thread at every admission; a clone takes 0.4 ms."""
        if dry not in self._dry:
            breakers = (ctypes.c_char_p * len(DRY_BREAKERS))(*(b.encode() for b in DRY_BREAKERS))
            self._dry[dry] = llama_cpp.llama_sampler_init_dry(self.vocab, dry.multiplier, dry.base,
                                                              dry.allowed_length, dry.last_n, breakers,
                                                              len(DRY_BREAKERS))
        return llama_cpp.llama_sampler_clone(self._dry[dry])

    def close(self) -> None:
        for template in self._dry.values():
            llama_cpp.llama_sampler_free(template)
        self._dry = {}
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
        self._overrides = self._patterns = None  # llama.cpp no longer reads them


class Context:
    """A context for up to n_seq_max sequences.

    kv_unified: one pool of n_ctx cells for all sequences. llama.cpp then evaluates any batch in one pass
    over the weights, but every token attends over every sequence's cells (masked). Otherwise each
    sequence has a stream of n_ctx / n_seq_max cells, and a batch is split into passes of consecutive
    sequence ids with equal token counts (llama-batch.cpp split_equal). Which is faster depends on the
    machine: scripts/bench.py's step rows measure both."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_seq_max: int, flash_attn: bool,
                 kv_cache_type: str, n_threads: int, kv_unified: bool = False):
        params = set_fields(llama_cpp.llama_context_default_params(), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                            n_seq_max=n_seq_max, kv_unified=kv_unified, n_threads=n_threads, n_threads_batch=n_threads,
                            flash_attn_type=(llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                             else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),
                            type_k=KV_TYPES[kv_cache_type], type_v=KV_TYPES[kv_cache_type], no_perf=True)
        self.model = model
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not make a context of {n_ctx} tokens for {n_seq_max} sequences")
        self.mem = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ptr)
        self.n_batch = llama_cpp.llama_n_batch(self.ptr)
        self.kv_unified = kv_unified

    def decode(self, batch: Batch) -> None:
        """Evaluate the batch and wait until its results are ready. On CUDA llama_decode returns once the
        work is queued (the H200 run timed 1,952 tok/s where answers ran at ~225): without the wait, every
        clock read after a decode times kernel launches. llama.cpp's server synchronizes before its clock too."""
        rc = llama_cpp.llama_decode(self.ptr, batch.c)
        if rc == 1:
            raise NoKvRoom(f"no free KV cells for {batch.n} tokens (n_ctx {self.n_ctx})")
        if rc != 0:
            raise LlamaError(f"llama_decode failed with code {rc}")
        llama_cpp.llama_synchronize(self.ptr)

    def logits(self, i: int) -> np.ndarray:
        """The logits of batch row i, as a writable view: valid until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise LlamaError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def positions(self, seq: int) -> tuple[int, int]:
        """The lowest and highest position sequence seq holds cells for; (-1, -1) when it holds none."""
        return (llama_cpp.llama_memory_seq_pos_min(self.mem, seq), llama_cpp.llama_memory_seq_pos_max(self.mem, seq))

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence seq's cells from position start on (all of it by default)."""
        if not llama_cpp.llama_memory_seq_rm(self.mem, seq, start, -1):
            raise LlamaError(f"llama.cpp could not drop positions {start}.. of sequence {seq}")

    def share(self, src: int, dst: int, keep: int) -> None:
        """Give sequence dst the cells of src's first `keep` positions, in place of its own. In a unified
        cache the cells are shared, not copied; with a stream per sequence llama.cpp copies src's whole
        stream (at the next decode), then dst drops what lies past `keep`."""
        self.forget(dst)
        if self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self.mem, src, dst, 0, keep)
            return
        llama_cpp.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.forget(dst, keep)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """Tokens of several sequences for one llama_decode."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.c = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        set_fields(self.c, n_tokens=0)

    def add(self, tokens: list[int], seq: int, start_pos: int, *, logits_last: bool) -> int:
        """Append tokens of sequence seq at positions start_pos...; return the row of the last one."""
        if not tokens or self.n + len(tokens) > self.capacity:
            raise LlamaError(f"cannot add {len(tokens)} tokens to a batch of {self.n} (capacity {self.capacity})")
        c = self.c
        for k, token in enumerate(tokens):
            i = self.n + k
            c.token[i], c.pos[i], c.n_seq_id[i], c.logits[i] = token, start_pos + k, 1, 0
            c.seq_id[i][0] = seq
        self.n += len(tokens)
        set_fields(c, n_tokens=self.n)
        if logits_last:
            c.logits[self.n - 1] = 1
        return self.n - 1

    def close(self) -> None:
        if self.capacity:
            llama_cpp.llama_batch_free(self.c)
            self.capacity = 0


class SamplerChain:
    """One sequence's sampling: its repeat penalty, then llama.cpp's C chain (top-k, DRY, top-p, temperature,
    draw).

    The penalty is applied here, to the few tokens in its window, rather than as a stage of the C chain:
    a token drawn and then refused by the grammar (constraint.py's lazy check) must not enter the history.
    With DRY, which keeps a history of its own, the chain is applied to a candidate array built here and
    told only the tokens the answer goes on with (as llama.cpp's own common sampler does), instead of
    llama_sampler_sample, which would accept every draw. DRY runs after top-k: on the 40 candidates left,
    not on every token of the vocabulary. Tokens in `exempt` (punctuation and line breaks, which a story
    repeats by nature) are never penalized."""

    PENALTY_LAST_N = 64  # sampled tokens the repeat penalty looks back over

    def __init__(self, *, temperature: float, top_p: float, repeat_penalty: float, seed: int, top_k: int = 40,
                 dry: Dry | None = None, model: Model | None = None, exempt: np.ndarray | None = None):
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.repeat_penalty = repeat_penalty
        self.history: deque[int] = deque(maxlen=self.PENALTY_LAST_N)
        self.exempt = exempt
        steps = [llama_cpp.llama_sampler_init_top_k(top_k)]
        self._candidates = None
        if dry is not None and dry.multiplier > 0:
            if model is None:
                raise ValueError("DRY needs the model's vocabulary")
            steps.append(model.dry_sampler(dry))
            self._candidates = np.empty(model.n_vocab, dtype=TOKEN_DATA)
            self._ids = np.arange(model.n_vocab, dtype=np.int32)
            self._array = set_fields(
                llama_cpp.llama_token_data_array(),
                data=self._candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                size=model.n_vocab, selected=-1, sorted=False)
        steps.append(llama_cpp.llama_sampler_init_top_p(top_p, 1))
        if temperature > 0:
            steps += [llama_cpp.llama_sampler_init_temp(temperature), llama_cpp.llama_sampler_init_dist(seed)]
        else:
            steps.append(llama_cpp.llama_sampler_init_greedy())
        for step in steps:
            llama_cpp.llama_sampler_chain_add(self.ptr, step)  # the chain owns and frees its steps

    def penalize(self, logits: np.ndarray) -> None:
        """llama.cpp's repeat penalty, in place: each token of the window made less likely, once."""
        if self.repeat_penalty == 1.0 or not self.history:
            return
        ids = np.fromiter(set(self.history), dtype=np.int64)
        if self.exempt is not None:
            ids = ids[~self.exempt[ids]]
        seen = logits[ids]
        logits[ids] = np.where(seen > 0, seen / self.repeat_penalty, seen * self.repeat_penalty)

    def draw(self, ctx: Context, row: int) -> int:
        """A token from batch row `row`'s logits as they are now (penalized, maybe restricted)."""
        if self._candidates is None:
            return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, row)
        candidates = self._candidates
        candidates["id"] = self._ids
        candidates["logit"] = ctx.logits(row)
        candidates["p"] = 0.0
        array = set_fields(self._array, size=len(candidates), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(array))
        return int(candidates["id"][array.selected])

    def accept(self, token: int) -> None:
        """The token the sequence goes on with: the penalty's window holds it from now on (and DRY's history)."""
        self.history.append(token)
        if self._candidates is not None:
            llama_cpp.llama_sampler_accept(self.ptr, token)

    def follow(self, tokens: list[int]) -> None:
        """Tokens the schema forced after a draw: DRY reads the answer as written; the penalty's window does
        not hold them (keys and quotes are not the model's choice)."""
        if self._candidates is not None:
            for token in tokens:
                llama_cpp.llama_sampler_accept(self.ptr, token)

    def sample(self, ctx: Context, row: int) -> int:
        """Penalize, draw and accept: a sequence with no grammar."""
        self.penalize(ctx.logits(row))
        token = self.draw(ctx, row)
        self.accept(token)
        return token

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


def exempt_tokens(model: Model) -> np.ndarray:
    """Whether each token of the vocabulary is only punctuation or white space (a mask over the vocabulary):
    the tokens a repeat penalty leaves alone, since every sentence ends with one."""
    mask = np.zeros(model.n_vocab, dtype=bool)
    for token in range(model.n_vocab):
        text = model.piece(token).decode("utf-8", errors="ignore")
        mask[token] = bool(text) and all(c.isspace() or unicodedata.category(c)[0] == "P" for c in text)
    return mask


def version() -> str:
    return llama_cpp.__version__
