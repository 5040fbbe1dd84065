"""A local Q4 GGUF model in llama.cpp (llama-cpp-python), the miner's first choice.

The model loads once. Offload (layers, context, KV cache type, flash attention) is planned by
models.fit unless the YAML pins it. Generations run one at a time (a lock queues the rest), each bounded by
max_tokens and by the request's deadline; output is grammar-constrained to the task's JSON schema.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from backends.base import Backend, BackendBusy, BackendError, Generation, Health, ModelInfo, Request
from backends.constrained import Sampler, decode
from backends.grammar import SchemaNotSupported, schema_to_gbnf
from backends.jsonwalk import JsonWalker, WalkError
from models import fit
from models.catalog import load_profile
from models.embedded import DISPLAY_NAME, EmbeddedModelMissing, embedded_model_path

log = logging.getLogger(__name__)

QUEUE_RESERVE_S = 8.0  # a queued request gives up waiting this long before its deadline
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
GET_A_MODEL = ("get one with `python scripts/download_model.py llama-3.1-8b` (or convert your own with "
               "scripts/convert_model.py), or leave model_path empty to use the embedded demo model")


def check_gguf(path: Path) -> None:
    """Fail early, naming the file, before llama.cpp gives a vaguer error."""
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist; {GET_A_MODEL}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BackendError(f"model file {path} is not a GGUF file (it starts {magic!r}); it may be "
                           f"corrupt or half-downloaded: delete it and {GET_A_MODEL}")


def default_threads() -> int:
    """llama-cpp-python's default (half the CPUs) leaves one of a small machine's two cores idle."""
    cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else cpus // 2


def load_planned(path: Path, plan: fit.Plan, settings: Any) -> tuple[llama_cpp.Llama, fit.Plan]:
    """Load with the plan; on a GPU out-of-memory, retry with fewer layers instead of crashing."""
    while True:
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_gpu_layers=plan.n_gpu_layers, n_ctx=plan.n_ctx,
                flash_attn=plan.flash_attn, type_k=KV_TYPES[plan.kv_cache_type],
                type_v=KV_TYPES[plan.kv_cache_type], n_threads=settings.n_threads or default_threads(),
                n_batch=min(settings.n_batch, plan.n_ctx), verbose=False)
            return llm, plan
        except ValueError as e:
            smaller = fit.fewer_layers(plan)
            if smaller is None:
                raise BackendError(f"llama.cpp could not load {path} ({e}); the file may be corrupt or "
                                   f"need a newer llama-cpp-python: re-download it, or {GET_A_MODEL}") from None
            log.warning("loading %s with %d GPU layers failed (%s); retrying with %d",
                        path.name, plan.n_gpu_layers, e, smaller.n_gpu_layers)
            plan = smaller


class LlamaCppBackend(Backend):
    type = "llama_cpp"

    def __init__(self, name: str, path: Path, settings: Any, display_name: str | None = None):
        super().__init__(name)
        check_gguf(path)
        self.path = path
        try:
            profile = load_profile(path)
        except (ValueError, OSError) as e:
            raise BackendError(f"cannot read the GGUF metadata of {path} ({e}); the file may be corrupt or "
                               f"truncated: re-download it, or {GET_A_MODEL}") from None
        if not profile.has_chat_template:  # checked before the load: a rebuild loop must not reload it
            raise BackendError(f"{path} has no chat template (tokenizer.chat_template) in its metadata; "
                               f"use an Instruct GGUF, or {GET_A_MODEL}")
        plan = fit.plan(profile, vram_bytes=int(settings.vram_gb * 2**30) if settings.vram_gb else None,
                        n_gpu_layers=settings.n_gpu_layers, n_ctx=settings.n_ctx,
                        kv_cache_type=settings.kv_cache_type, flash_attn=settings.flash_attn)
        started = time.monotonic()
        self.llm, self.plan = load_planned(path, plan, settings)
        meta = self.llm.metadata
        self.model_name = display_name or meta.get("general.name") or path.stem
        self.seed = settings.seed
        self._lock = threading.Lock()
        template = meta["tokenizer.chat_template"]
        vocab = self.llm._model
        self._bos = vocab.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = vocab.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=self._bos)
        log.info("loaded %s in %.1f s\n%s", self.model_name, time.monotonic() - started, self.plan.table())

    @classmethod
    def from_settings(cls, settings: Any) -> LlamaCppBackend:
        if settings.model_path:
            return cls(settings.label, Path(settings.model_path).expanduser(), settings)
        try:
            path = embedded_model_path()
        except EmbeddedModelMissing as e:
            raise BackendError(str(e)) from None
        log.info("no model_path configured: using the embedded demo model %s", DISPLAY_NAME)
        return cls(settings.label, path, settings, display_name=DISPLAY_NAME)

    def info(self) -> ModelInfo:
        return ModelInfo(
            mode="local", name=self.model_name, provider="llama.cpp", version=llama_cpp.__version__,
            parameters={"file": self.path.name, "n_gpu_layers": self.plan.n_gpu_layers, "n_ctx": self.plan.n_ctx,
                        "kv_cache_type": self.plan.kv_cache_type, "flash_attn": self.plan.flash_attn})

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self._formatter(messages=messages).prompt
        # Templates that write the BOS text themselves must not get a second one.
        add_bos = not (self._bos and prompt.startswith(self._bos))
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def _prefill(self, tokens: list[int]) -> None:
        """Evaluate the prompt, reusing the KV cache for the prefix it shares with the last one."""
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        shared = 0
        for a, b in zip(cached, tokens[:-1]):  # keep at least one token to evaluate for fresh logits
            if a != b:
                break
            shared += 1
        self.llm.n_tokens = shared
        self.llm.eval(tokens[shared:])

    def generate(self, request: Request) -> Generation:
        # Wait our turn, but leave time to generate, or for a fallback backend to.
        if not self._lock.acquire(timeout=max(request.seconds_left() - QUEUE_RESERVE_S, 0)):
            raise BackendBusy(f"busy with earlier requests until {QUEUE_RESERVE_S:.0f} s before the deadline")
        try:
            return self._generate_locked(request)
        finally:
            self._lock.release()

    def _generate_locked(self, request: Request) -> Generation:
        start = time.perf_counter()
        tokens = self.prompt_tokens(request.messages)
        if len(tokens) >= self.plan.n_ctx - 16:
            raise BackendError(f"the prompt is {len(tokens)} tokens but n_ctx is {self.plan.n_ctx}; "
                               f"raise backends.n_ctx or lower generation.max_context_chars")
        try:
            grammar = schema_to_gbnf(request.schema) if request.schema else None
        except SchemaNotSupported as e:
            raise BackendError(f"cannot constrain output to the schema: {e}") from None
        walker = None
        if request.schema:
            with contextlib.suppress(WalkError):  # no walker: every token is sampled, still correct
                walker = JsonWalker(request.schema)
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)
        sampler = Sampler(self.llm, grammar, temperature=request.temperature, top_p=request.top_p, seed=seed,
                          repeat_penalty=request.repeat_penalty)
        try:
            self._prefill(tokens)
            stats = decode(self.llm, sampler, request.max_tokens, request.deadline, walker)
        finally:
            sampler.close()
        if grammar and stats.finish_reason == "length":
            raise BackendError(f"the answer reached {len(stats.tokens)} tokens (max_tokens {request.max_tokens}, "
                               f"n_ctx {self.plan.n_ctx}) before its JSON was complete")
        text = self.llm.detokenize(stats.tokens).decode("utf-8", errors="replace")
        seconds = time.perf_counter() - start
        log.debug("%s: %d prompt + %d tokens (%d forced) in %.2f s, %d grammar rejections",
                  self.name, len(tokens), len(stats.tokens), stats.forced, seconds, stats.rejected)
        return Generation(text=text, prompt_tokens=len(tokens), completion_tokens=len(stats.tokens),
                          seconds=seconds, backend=self.name, model=self.info(), finish_reason=stats.finish_reason)

    def health(self) -> Health:
        if not self._lock.acquire(blocking=False):
            return Health(True, "busy serving a request")
        try:
            request = Request(messages=[{"role": "user", "content": "Say OK."}], max_tokens=2,
                              deadline=time.monotonic() + 30, temperature=0.0)
            generation = self._generate_locked(request)
        except BackendError as e:
            return Health(False, str(e))
        finally:
            self._lock.release()
        where = f"{self.plan.n_gpu_layers} layers on GPU" if self.plan.n_gpu_layers else "CPU only"
        return Health(True, f"{self.model_name}: generated {generation.completion_tokens} tokens ({where})")

    def close(self) -> None:
        with self._lock:  # never free the model under a running generation
            self.llm.close()
