"""A local Q4 GGUF model in llama.cpp, the miner's first choice.

The model loads once, with offload (layers, context, KV cache type, flash attention) planned by
models.fit unless the YAML pins it. Up to `parallel` requests decode together (backends/engine/),
each held to its JSON schema by llguidance (backends/constraint.py) and sized to its time: a warm-up
measures this machine's speed, and each answer's string bounds are shrunk only as far as the clock at the
current load requires (backends/sizing.py). The request's deadline is the hard limit; its target sizes.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Literal

from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from pydantic import Field, ValidationInfo, field_validator, model_validator

from backends import llama_lowlevel as ll
from backends.base import (Backend, BackendBusy, BackendError, BackendSettings, DeadlineExceeded, Gauges, Generation,
                           Health, ModelInfo, Request)
from backends.engine import Engine, Job, Load, Result
from backends.engine.step_clock import STALL_FLOOR_S, StepClock, stall_limit, stalled
from backends.constraint import Vocabulary
from backends.llama_build import system_info
from backends.sizing import CharCost, Cost, fit_schema, shrink, value_chars, worst_case
from models import fit
from backends.errors import DoesNotFit
from models.errors import ModelError, UnloadableModelError
from models.catalog import load_profile
from models.host import default_threads, ram_bytes
from models.embedded import DISPLAY_NAME, EmbeddedModelMissing, embedded_model_path

log = logging.getLogger(__name__)

GET_A_MODEL = ("get one with `.venv/bin/storynet-miner download llama-3.1-8b` (it prints the model_path to use; or "
               "convert your own with `storynet-miner convert`), or leave model_path empty to use the embedded "
               "demo model")
# What one request needs of the KV cache: its prompt, and the longest answer the miner must be able to
# write at its floors (a 1000-character chapter with its title and choices) in the densest script.
PROMPT_CELLS, LONGEST_FLOOR_CHARS = 1024, 1200
DENSE_TEXT = "灯塔看守人每晚数着过往的船只，把它们的名字写进一本无人翻阅的账簿。"  # CJK: most tokens a character
MAX_AUTO_PARALLEL = 8
FUTURE_GRACE_S = 5.0
REVIVE_EVERY_S = 60.0  # a context that keeps breaking is not rebuilt in a loop
CLOSE_WAIT_S = 10.0  # for callers to leave once the engine has failed their answers, before the model is freed
MAX_TOKENS_MARGIN = 1.5  # the model may spend more tokens a character than the sample: a safety bound
RUNAWAY_RETRIES = 1  # an answer cut off at that bound starts over once, planned from what it wrote
WARM_UP_TEXT = ("The lighthouse keeper counted the ships each night, writing their names in a ledger that "
                "nobody read. " + DENSE_TEXT)


class LlamaCppSettings(BackendSettings):
    type: Literal["llama_cpp"]
    model_path: str | None = Field(
        None, description="Q4 GGUF file (first part of a split file). Empty: the embedded SmolLM2 demo model.")
    n_gpu_layers: int | Literal["auto"] = Field(
        "auto", description="Layers to offload to the GPU; -1 all, 0 none, auto plans to fit free VRAM.")
    n_ctx: int | Literal["auto"] = Field("auto", description="Context length in tokens; auto plans it.")
    flash_attn: bool | Literal["auto"] = Field("auto", description="Flash attention (needed for a quantized V cache).")
    kv_cache_type: Literal["auto", "f16", "q8_0"] = Field("auto", description="KV cache precision; q8_0 halves it.")
    vram_gb: float | None = Field(None, gt=0, description="VRAM budget for planning; default: what the GPU reports free.")
    n_threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads; default: every core up to 4, half of them beyond (hyperthreads).")
    n_batch: int = Field(512, ge=32, le=8192, description="Most tokens evaluated in one step, all sequences together.")
    parallel: int | Literal["auto"] = Field(
        "auto", description="Requests decoded together, each with n_ctx / parallel tokens of KV cache; auto: as "
        "many as the context holds the longest answer for (2048 tokens each for Llama-3, 4096 for SmolLM2), up to 8.")
    kv_unified: bool | Literal["auto"] = Field(
        "auto", description="One KV cache pool for all requests (llama.cpp evaluates any step in one pass over the "
        "weights) or a stream per request (attention over its own cells only; a step of non-consecutive requests "
        "takes several passes). auto: unified when layers are on the GPU, a stream each on the CPU, as measured "
        "(scripts/bench.py's step rows, docs/measurements.md).")
    seed: int | None = Field(None, ge=0, description="Sampling seed: requests draw with seed, seed + 1, ... in the "
                             "order they are prepared (a run can be repeated, and identical requests still answer "
                             "differently); default: a fresh random seed for every request.")
    mmap: bool | Literal["auto"] = Field(
        "auto", description="Map the model file instead of reading it into memory. A mapped file must not be "
        "overwritten in place while the miner runs (the process dies of SIGBUS); mapping lets a model larger "
        "than RAM run. auto: read it when it fits in half the RAM, map it otherwise; read it when experts stay in "
        "RAM (n_cpu_moe above 0), as llama.cpp advises for tensors kept on the CPU.")
    n_cpu_moe: int | Literal["auto"] = Field(
        "auto", description="MoE models: keep the experts of the first N blocks in system RAM, as llama.cpp's "
        "--n-cpu-moe; auto: the fewest that let every layer on the GPU.")
    engine_process: bool = Field(
        True, description="Run the model and its engine in a child process the miner supervises: a crash or a "
        "CUDA fault there costs the answers in flight, not the miner, and a step that stops returning is caught; "
        "the child is restarted. false: in the miner's own process (a fault there takes the miner down).")
    stall_s: float = Field(
        STALL_FLOOR_S, ge=1, description="A step that has run max(stall_s, 10x its planned time) counts as "
        "stalled: health says down, and a supervised engine process is killed and restarted.")
    vram_margin: float = Field(
        0.10, ge=0, le=10, description="GPU memory the engine process may use beyond its plan, as a share of the "
        "plan, before health says degraded (memory that grows over days is a leak or fragmentation).")

    @field_validator("n_gpu_layers")
    @classmethod
    def _layers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < -1:
            raise ValueError("must be -1 (all), 0 (none), a positive layer count, or auto")
        return v

    @field_validator("n_ctx", "parallel", "n_cpu_moe")
    @classmethod
    def _in_range(cls, v: int | str, info: ValidationInfo) -> int | str:
        lo, hi = {"n_ctx": (512, 131072), "parallel": (1, 64), "n_cpu_moe": (0, 4096)}[info.field_name]
        if isinstance(v, int) and not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, or auto")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LlamaCppSettings:
        if self.kv_cache_type == "q8_0" and self.flash_attn is False:
            raise ValueError("kv_cache_type q8_0 needs flash_attn (llama.cpp quantizes the V cache only with "
                             "it): set flash_attn: true or auto, or kv_cache_type: f16")
        if isinstance(self.parallel, int) and self.parallel > self.n_batch:
            raise ValueError(f"parallel ({self.parallel}) must not exceed n_batch ({self.n_batch}): every "
                             f"decoding request needs a token of each step's batch")
        return self


def offload_problem(asked: int | str, plan: fit.Plan, gpu_build: bool) -> tuple[bool, str] | None:
    """(down, what to do) when GPU offload was asked for and no layer got a device: with a number asked it is
    down, with auto on a build that has GPU offload degraded (a driver fault or a lost device after a restart
    looks exactly like this, and runs every layer on the CPU, slowly); None when all is as asked."""
    if plan.n_gpu_layers != 0 or asked == 0 or (asked == "auto" and not gpu_build):
        return None
    why = plan.notes[0].removeprefix("CPU only: ") if plan.notes else "no GPU was found"
    if asked == "auto":
        return False, (f"n_gpu_layers is auto and this llama.cpp build has GPU offload, but every layer runs on the "
                       f"CPU ({why}): check the driver with `nvidia-smi`, then restart the miner")
    return True, f"n_gpu_layers is {asked}, but the model runs on the CPU: {why}; or set n_gpu_layers: 0"


def check_gguf(path: Path) -> None:
    """Fail early, naming the file, before llama.cpp gives a vaguer error."""
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist; {GET_A_MODEL}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BackendError(f"model file {path} is not a GGUF file (it starts {magic!r}); it may be "
                           f"corrupt or half-downloaded: delete it and {GET_A_MODEL}")


def file_identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def cells_per_request(model: ll.Model) -> int:
    """KV cells a request needs on this model, in whole kilotokens (3072-4096 for SmolLM2, 2048 for Llama-3)."""
    dense = len(model.tokenize(DENSE_TEXT, add_special=False, parse_special=False)) / len(DENSE_TEXT)
    return -(-(PROMPT_CELLS + int(LONGEST_FLOOR_CHARS * dense)) // 1024) * 1024


def parallel_for(setting: int | str, n_ctx: int, cells: int) -> int:
    if setting != "auto":
        return int(setting)
    return max(1, min(MAX_AUTO_PARALLEL, n_ctx // cells))


def use_mmap(setting: bool | str, path: Path, n_cpu_moe: int = 0) -> bool:
    if setting != "auto":
        return bool(setting)
    if n_cpu_moe:  # llama.cpp's advice for tensors kept on the CPU: --load-mode none (src/llama-model-loader.cpp)
        return False
    return path.stat().st_size > ram_bytes()[0] / 2


def kv_unified(setting: bool | str, plan: fit.Plan) -> bool:
    return plan.n_gpu_layers != 0 if setting == "auto" else bool(setting)


def make_context(model: ll.Model, plan: fit.Plan, settings: LlamaCppSettings, parallel: int) -> ll.Context:
    return ll.Context(model, n_ctx=plan.n_ctx, n_batch=min(settings.n_batch, plan.n_ctx), n_seq_max=parallel,
                      flash_attn=plan.flash_attn, kv_cache_type=plan.kv_cache_type,
                      n_threads=settings.n_threads or default_threads(),
                      kv_unified=kv_unified(settings.kv_unified, plan))


def load_planned(path: Path, plan: fit.Plan, settings: LlamaCppSettings) -> tuple[ll.Model, ll.Context, fit.Plan, int]:
    """Load with the plan; when the GPU runs out of memory, retry with less on it (fit.fewer_layers: more
    blocks' experts in system RAM, then fewer layers) instead of crashing."""
    while True:
        model = None
        try:
            model = ll.Model(path, plan.n_gpu_layers, mmap=use_mmap(settings.mmap, path, plan.n_cpu_moe),
                             n_cpu_moe=plan.n_cpu_moe)
            parallel = parallel_for(settings.parallel, plan.n_ctx, cells_per_request(model))
            return model, make_context(model, plan, settings, parallel), plan, parallel
        except ll.LlamaError as e:
            if model is not None:
                model.close()
            smaller = fit.fewer_layers(plan)
            if smaller is None:
                raise BackendError(f"{e}; the file may be corrupt or need a newer llama-cpp-python: "
                                   f"re-download it, or {GET_A_MODEL}") from None
            log.warning("loading %s with %d GPU layers (n_cpu_moe %d) failed (%s); retrying with %d (n_cpu_moe %d)",
                        path.name, plan.n_gpu_layers, plan.n_cpu_moe, e, smaller.n_gpu_layers, smaller.n_cpu_moe)
            plan = smaller


class LlamaCppBackend(Backend):
    type = "llama_cpp"
    mode = "local"
    Settings = LlamaCppSettings

    def __init__(self, name: str, path: Path, settings: LlamaCppSettings, display_name: str | None = None,
                 clock: StepClock | None = None):
        """clock: where the engine marks each step (shared memory when a supervisor watches it)."""
        super().__init__(name)
        check_gguf(path)
        self.path = path
        self.settings = settings
        self.clock = clock if clock is not None else StepClock()
        try:
            profile = load_profile(path)
        except UnloadableModelError as e:  # its own line, the same as `download` and `fit` say: not "corrupt"
            raise BackendError(str(e)) from None
        except (ModelError, OSError) as e:
            raise BackendError(f"cannot read the GGUF metadata of {path} ({e}); the file may be corrupt or "
                               f"truncated: re-download it, or {GET_A_MODEL}") from None
        if not profile.has_chat_template:  # checked before the load: a rebuild loop must not reload it
            raise BackendError(f"{path} has no chat template (tokenizer.chat_template) in its metadata; "
                               f"use an Instruct GGUF, or {GET_A_MODEL}")
        plan = fit.plan(profile, vram_bytes=int(settings.vram_gb * 2**30) if settings.vram_gb else None,
                        n_gpu_layers=settings.n_gpu_layers, n_ctx=settings.n_ctx,
                        kv_cache_type=settings.kv_cache_type, flash_attn=settings.flash_attn,
                        n_cpu_moe=settings.n_cpu_moe)
        started = time.monotonic()
        log.info("llama.cpp %s, build: %s", ll.version(), system_info())  # before the load: a crash names it
        self._file = file_identity(path)
        # GPU memory in use before the load: what the engine's own use is measured from (backends/llama_process.py)
        self.gpu_used_before_load = (fit.gpu_memory() or (None,))[0] if plan.n_gpu_layers else None
        self.model, self.ctx, self.plan, self.parallel = load_planned(path, plan, settings)
        self.engine: Engine | None = None
        self._calls, self._closed, self._calls_done = 0, False, threading.Condition()
        try:
            self.model_name = display_name or self.model.meta("general.name") or path.stem
            self.seed = settings.seed
            self._requests = itertools.count()  # with a seed, request k draws with seed + k
            bos, eos = (self.model.special_token(k) for k in ("bos", "eos"))
            self._bos = self.model.piece(bos).decode(errors="replace") if bos >= 0 else ""
            eos_text = self.model.piece(eos).decode(errors="replace") if eos >= 0 else ""
            self._formatter = Jinja2ChatFormatter(template=self.model.chat_template() or "", eos_token=eos_text,
                                                  bos_token=self._bos)
            self.char_cost = CharCost(self.count_tokens)
            # A schema's forced text (its skeleton) comes back with every request of its task and size:
            # counted once, not at each of admission's ten sizing steps.
            self._forced_tokens = functools.lru_cache(maxsize=1024)(self.count_tokens)
            self._vocab = Vocabulary(self.model)
            self._exempt = ll.exempt_tokens(self.model)  # punctuation and line breaks: no repeat penalty
            self._revive_lock, self._revived_at, self.revived = threading.Lock(), 0.0, None
            self._start_engine()
        except Exception as e:
            self.ctx.close()
            self.model.close()
            if isinstance(e, ll.LlamaError):
                raise BackendError(f"{path}: llama.cpp failed while warming up ({e}); check the llama_cpp "
                                   f"settings (n_ctx, n_batch, parallel), or {GET_A_MODEL}") from None
            raise
        log.info("loaded %s in %.1f s; %d requests decode together; measured %s\n%s", self.model_name,
                 time.monotonic() - started, self.parallel, self.engine.speed.snapshot(), self.plan.table())

    def _start_engine(self) -> None:
        """A new engine, warmed up before anyone can reach it: a request on another thread sees the old one
        (stopped: it waits in _revive) or this one, ready."""
        engine = Engine(self.model, self.ctx, self._vocab, self.parallel, clock=self.clock)
        warm_up = self.prompt_tokens([{"role": "user", "content": WARM_UP_TEXT * 3}])
        try:
            engine.start(warm_up[:192])
        except BaseException:
            engine.close()
            raise
        self.engine = engine

    def _revive(self) -> None:
        """A stopped engine (its context broke: decodes kept failing) is rebuilt on a fresh context, at most
        once a minute; the model stays loaded. Callers of the old engine have had their answers failed."""
        with self._revive_lock:
            if self.engine.alive() or self._closed or time.monotonic() - self._revived_at < REVIVE_EVERY_S:
                return
            self._revived_at = time.monotonic()
            why = self.engine.stopped_because or "unknown"
            log.warning("%s: the llama.cpp engine stopped (%s); rebuilding its context", self.name, why)
            self.engine.close()
            self.ctx.close()
            try:
                self.ctx = make_context(self.model, self.plan, self.settings, self.parallel)
                self._start_engine()
            except Exception as e:
                log.exception("%s: rebuilding the llama.cpp context failed", self.name)
                self.revived = f"the llama.cpp context broke ({why}) and rebuilding it failed: {type(e).__name__}: {e}"
                return
            self.revived = f"rebuilt the llama.cpp context at {time.strftime('%H:%M:%S')} after: {why}"
            log.warning("%s: %s", self.name, self.revived)

    @classmethod
    def from_settings(cls, settings: LlamaCppSettings, clock: StepClock | None = None) -> LlamaCppBackend:
        """In this process, whatever settings.engine_process says (backends/llama_process.py reads it)."""
        if settings.model_path:
            return cls(settings.label, Path(settings.model_path).expanduser(), settings, clock=clock)
        try:
            path = embedded_model_path()
        except EmbeddedModelMissing as e:
            raise BackendError(str(e)) from None
        log.info("no model_path configured: using the embedded demo model %s", DISPLAY_NAME)
        return cls(settings.label, path, settings, display_name=DISPLAY_NAME, clock=clock)

    def facts(self) -> dict[str, Any]:
        """What a supervisor in another process needs to know of this load, once."""
        return {"info": self.info(), "parallel": self.parallel, "n_gpu_layers": self.plan.n_gpu_layers,
                "estimated_vram_bytes": self.plan.estimated_vram_bytes,
                "gpu_used_before_load": self.gpu_used_before_load}

    def info(self) -> ModelInfo:
        return ModelInfo(
            mode=self.mode, name=self.model_name, provider="llama.cpp", version=ll.version(),
            parameters={"file": self.path.name, "n_gpu_layers": self.plan.n_gpu_layers, "n_ctx": self.plan.n_ctx,
                        "kv_cache_type": self.plan.kv_cache_type, "flash_attn": self.plan.flash_attn,
                        "parallel": self.parallel})

    # --- text and tokens ----------------------------------------------------------------------------
    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self._formatter(messages=messages).prompt
        # Templates that write the BOS text themselves must not get a second one.
        add_bos = self.model.adds_bos() and not (self._bos and prompt.startswith(self._bos))
        tokens = self.model.tokenize(prompt, add_special=False, parse_special=True)
        return ([self.model.special_token("bos")] if add_bos else []) + tokens

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, add_special=False, parse_special=False))

    def tokens_per_char(self, sample: str) -> float:
        """The high estimate of what a character of the sample's language costs (sizing.CharCost)."""
        return self.char_cost.high(sample or WARM_UP_TEXT)

    def _learn_tokens_per_char(self, text: str, sampled_tokens: int) -> None:
        """What an answer's string values cost, whole or cut off at its cap (value_chars reads either)."""
        self.char_cost.learn(value_chars(text), sampled_tokens)

    # --- generating ---------------------------------------------------------------------------------
    def generate(self, request: Request) -> Generation:
        with self._calls_done:  # close() frees the model only once every caller has left
            if self._closed:
                raise BackendError(f"{self.name}: the model is closed (the miner is shutting down)")
            self._calls += 1
        try:
            return self._generate(request)
        finally:
            with self._calls_done:
                self._calls -= 1
                self._calls_done.notify_all()

    def _generate(self, request: Request) -> Generation:
        started = time.monotonic()
        if not math.isfinite(request.deadline):
            raise BackendError(f"the request's deadline is {request.deadline}: it must be a finite time")
        for attempt in range(RUNAWAY_RETRIES + 1):
            result, text = self._attempt(request)
            if request.schema and not request.prefix:  # a cut-off answer shows its plan too low: learned too
                self._learn_tokens_per_char(text, len(result.tokens) - result.forced)
            if not (request.schema and result.finish_reason == "length"):
                break
            if request.prefix or attempt == RUNAWAY_RETRIES:  # overload, not a fault: the chain moves on
                raise BackendBusy(f"busy: the answer reached {len(result.tokens)} tokens before its JSON was "
                                  f"complete ({result.note})")
            log.info("%s: the answer reached %d tokens before its JSON was complete (%s); starting over, planned "
                     "from what it wrote", self.name, len(result.tokens), result.note)
        seconds = time.monotonic() - started
        log.debug("%s: %d prompt tokens (%d reused) + %d tokens (%d forced) in %.2f s after %.2f s queued; %s",
                  self.name, result.prompt_tokens, result.reused_tokens, len(result.tokens), result.forced,
                  seconds, result.queued_s, result.note)
        return Generation(text=text, prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens),
                          seconds=seconds, backend=self.name, model=self.info(),
                          finish_reason=result.finish_reason, schema=result.schema,
                          cached_tokens=result.reused_tokens, forced_tokens=result.forced,
                          first_token_s=result.first_token_s)

    def _attempt(self, request: Request) -> tuple[Result, str]:
        """One run of the request through the engine: planned, admitted, written; its result and text."""
        if not self.engine.alive():
            self._revive()
        tpc = self.tokens_per_char(request.language_sample)
        prompt_estimate = len(self.prompt_tokens(request.messages))
        floor = shrink(request.schema, 0.0) if request.schema and request.resize else request.schema
        floor_cost = self._cost(floor, tpc) if floor else Cost(request.max_tokens, 0)
        share = self.engine.prefill_share()
        floor_s = tuple(self._seconds(floor_cost, prompt_estimate, n, share) for n in (1, self.parallel))
        ticket = self.engine.submit(request.deadline, lambda load: self._prepare(request, tpc, load, prompt_estimate),
                                    floor_s, request.priority, prompt_estimate, request.cancelled)
        try:  # the engine answers every ticket by its limit; the timeout only guards against a bug there
            result = ticket.future.result(timeout=max(request.seconds_left(), 0.0) + FUTURE_GRACE_S)
        except FutureTimeout:
            ticket.cancelled.set()  # its slot frees at the next step
            raise DeadlineExceeded(f"{self.name}: no answer from the engine by the hard limit") from None
        return result, request.prefix + self.model.detokenize(result.tokens).decode("utf-8", errors="replace")

    def _cost(self, schema: dict[str, Any], tpc: float) -> Cost:
        return worst_case(schema, tpc, self._forced_tokens)

    def _seconds(self, cost: Cost, prompt_tokens: int, sequences: int, prefill_share: float) -> float:
        return self.engine.speed.planned(cost, prompt_tokens, sequences, prefill_share)

    def _prepare(self, request: Request, tpc: float, load: Load, asked_prompt: int) -> Job:
        """At admission: size the answer for the load it will run under, then build its prompt and state."""
        prefix = (self.model.tokenize(request.prefix, add_special=False, parse_special=False)
                  if request.prefix else [])
        schema, messages, cost, note = self._plan(request, tpc, load, asked_prompt + len(prefix), len(prefix))
        prompt = self.prompt_tokens(messages) + prefix
        max_tokens = min(request.max_tokens, load.kv_room - len(prompt))
        if cost is not None and cost.bounded:  # unbounded: only the hard limit ends it
            max_tokens = min(max_tokens, math.ceil(cost.tokens * MAX_TOKENS_MARGIN) + 16)
        if max_tokens < 1:
            raise DoesNotFit(f"does not fit: the prompt is {len(prompt)} tokens and each request has "
                              f"{load.kv_room} tokens of KV cache; raise n_ctx or set a lower parallel")
        matcher = self._vocab.matcher(schema) if schema is not None else None
        if matcher is not None and prefix:
            matcher.consume(prefix)
        n = next(self._requests)
        seed = (self.seed + n) % 2**31 if self.seed is not None else random.SystemRandom().randrange(2**31)
        sampler = ll.SamplerChain(temperature=request.temperature, top_p=request.top_p,
                                  repeat_penalty=request.repeat_penalty, seed=seed, dry=request.dry, model=self.model,
                                  exempt=self._exempt)
        return Job(prompt, sampler, matcher, max_tokens, schema=schema, note=note,
                   cost=cost if cost is not None and cost.bounded else None,
                   shape=tuple(schema.get("properties", ())) if schema is not None else ())

    def _plan(self, request: Request, tpc: float, load: Load, prompt_n: int,
              prefix_tokens: int) -> tuple[dict[str, Any] | None, list[dict[str, str]], Cost | None, str]:
        """The schema and messages of this answer, sized for the load, with its worst case; BackendBusy
        when even its smallest answer cannot be written before the hard limit. prompt_n: the prompt as
        asked, prefix included (counted once, off the engine thread)."""
        if request.schema is None:
            return None, request.messages, None, "free text"
        target_s, hard_s = request.target_time() - load.now, request.deadline - load.now
        room = load.kv_room - prompt_n
        if request.resize is None or prefix_tokens:  # as asked; a retry continues under the schema it had
            cost = self._cost(request.schema, tpc)
            rest = Cost(max(cost.sampled - prefix_tokens, 0), cost.forced)
            if cost.bounded and self._seconds(rest, prompt_n, load.sequences, load.prefill_share) > hard_s:
                raise BackendBusy(f"busy: with {load.sequences} answers decoding, the answer cannot be written "
                                  f"in the {hard_s:.0f} s left")
            return request.schema, request.messages, cost, "fixed size"
        floor = self._cost(shrink(request.schema, 0.0), tpc)
        if floor.tokens > room:
            raise DoesNotFit(f"does not fit: even the smallest answer needs {floor.tokens:.0f} tokens of KV cache "
                              f"beside its {prompt_n}-token prompt, and each request has {load.kv_room}; raise n_ctx "
                              f"or set a lower parallel")

        def seconds_of(schema: dict[str, Any]) -> tuple[Cost, float]:
            cost = self._cost(schema, tpc)
            return cost, (self._seconds(cost, prompt_n, load.sequences, load.prefill_share) if cost.tokens <= room
                          else math.inf)

        sized = fit_schema(request.schema, seconds_of, target_s, hard_s)
        if sized is None:
            raise BackendBusy(f"busy: with {load.sequences} answers decoding, even the smallest answer needs more "
                              f"than the {hard_s:.0f} s left")
        note = (f"size {sized.scale:.2f} of full for {load.sequences} sequences and {load.prefill_share:.0%} "
                f"prompt time, worst case "
                f"{sized.cost.tokens:.0f} tokens in {sized.seconds:.1f} s"
                + (" (past the target)" if sized.past_target else ""))
        return sized.schema, request.resize(sized.schema), sized.cost, note

    def file_problem(self) -> str | None:
        """The model serves from memory; what changed on disk since it was loaded would bite on restart."""
        try:
            now = file_identity(self.path)
        except OSError as e:
            return (f"model file {self.path} is gone since it was loaded ({e.strerror}): this run serves the copy "
                    f"in memory, but the next start will fail; put the file back, or {GET_A_MODEL}")
        if now != self._file:
            return (f"model file {self.path} was replaced since it was loaded: this run serves the old model; "
                    f"restart the miner to load the new file")
        return None

    def health(self) -> Health:
        health = self._health()
        problem = self.file_problem()
        return Health(health.ok, f"{health.detail}; but {problem}") if problem else health

    def _health(self) -> Health:
        offload = offload_problem(self.settings.n_gpu_layers, self.plan, fit.gpu_offload())
        if offload and offload[0]:  # llama.cpp would say nothing of it
            return Health(False, offload[1])
        if (running := stalled(self.clock, self.settings.stall_s)) is not None:
            return Health(False, f"{self.model_name}: stalled: a llama.cpp step has run {running:.0f} s (limit "
                                 f"{stall_limit(self.clock.planned, self.settings.stall_s):.0f} s); set "
                                 f"engine_process: true to have it restarted, or restart the miner")
        where = f"{self.plan.n_gpu_layers} layers on GPU" if self.plan.n_gpu_layers else "CPU only"
        if offload:
            return Health(True, f"{self.model_name}: {offload[1]}", degraded=True)
        if not self.engine.alive():
            self._revive()
        if not self.engine.alive():
            why = self.revived or f"the llama.cpp engine stopped: {self.engine.stopped_because or 'the log says why'}"
            return Health(False, f"{self.model_name}: {why}; it is rebuilt at most once a minute, or restart the miner")
        busy = self.engine.active() + self.engine.waiting()
        if busy:
            return Health(True, f"{self.model_name}: serving {busy} requests ({where})")
        request = Request(messages=[{"role": "user", "content": "Say OK."}], max_tokens=2,
                          deadline=time.monotonic() + 30, temperature=0.0)
        try:
            generation = self.generate(request)
        except BackendError as e:
            return Health(False, str(e))
        news = f"; {self.revived}" if self.revived else ""
        return Health(True, f"{self.model_name}: generated {generation.completion_tokens} tokens ({where}){news}")

    def gauges(self) -> Gauges:
        engine = self.engine
        learned = engine.speed.snapshot()["decode_tok_s_by_sequences"]
        # Only a process with layers on the GPU asks it: asking makes a CUDA context, hundreds of MiB of VRAM.
        memory = fit.gpu_memory() if self.plan.n_gpu_layers else None
        return Gauges(engine.active(), engine.waiting(), learned, self.clock.last_step_age_s(), gpu_memory=memory,
                      prefill_tok_s=round(engine.speed.prefill_tps, 1))

    def close(self) -> None:
        with self._calls_done:
            if self._closed:
                return
            self._closed = True
        self.engine.close()  # stops the decode loop and fails every answer in it: their callers return
        with self._calls_done:
            if not self._calls_done.wait_for(lambda: self._calls == 0, timeout=CLOSE_WAIT_S):
                log.warning("%s: %d callers still inside after %.0f s; leaving the model loaded", self.name,
                            self._calls, CLOSE_WAIT_S)
                return
        self.ctx.close()
        self.model.close()
