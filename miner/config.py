"""Typed configuration: YAML validated into these models, CLI flags on top.

Every field has bounds and a description; a wrong key or value fails at start with a message that
names the key, e.g. `backends.0.n_ctx: Input should be greater than or equal to 512`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _BackendBase(_Strict):
    name: str | None = Field(None, description="Label used in logs and health output; defaults to the type.")

    @property
    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class LlamaCppSettings(_BackendBase):
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
    seed: int | None = Field(None, ge=0, description="Sampling seed; default: fresh for every request.")

    @field_validator("n_gpu_layers")
    @classmethod
    def _layers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < -1:
            raise ValueError("must be -1 (all), 0 (none), a positive layer count, or auto")
        return v

    @field_validator("n_ctx", "parallel")
    @classmethod
    def _in_range(cls, v: int | str, info: ValidationInfo) -> int | str:
        lo, hi = {"n_ctx": (512, 131072), "parallel": (1, 64)}[info.field_name]
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


class OpenAISettings(_BackendBase):
    type: Literal["openai"]
    model: str = Field(..., description="Model name as the server knows it, e.g. gpt-4o-mini.")
    base_url: str | None = Field(None, description="OpenAI-compatible server (vLLM, llama.cpp server, ollama); empty: OpenAI.")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable holding the key; null for servers without one.")
    structured_output: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="json_schema sends the task's schema; json_object for servers without it.")
    timeout_s: float = Field(20.0, gt=0, le=120, description="Per-call timeout, capped by the request deadline.")
    max_retries: int = Field(1, ge=0, le=5, description="Retries on timeouts and 5xx while the deadline allows.")


class GeminiSettings(_BackendBase):
    type: Literal["gemini"]
    model: str = Field("gemini-2.0-flash", description="Gemini model name.")
    api_key_env: str = Field("GEMINI_API_KEY", description="Environment variable holding the key.")
    base_url: str | None = Field(None, description="Override the API endpoint (proxies, tests).")
    timeout_s: float = Field(20.0, gt=0, le=120, description="Per-call timeout, capped by the request deadline.")
    max_retries: int = Field(1, ge=0, le=5, description="Retries on timeouts, 429 and 5xx while the deadline allows.")


class CustomSettings(_BackendBase):
    type: Literal["custom"]
    command: list[str] = Field(..., min_length=1, description="Argv of a program: request JSON on stdin, answer JSON on stdout.")
    cwd: str | None = Field(None, description="Working directory for the command.")
    timeout_s: float = Field(25.0, gt=0, le=120, description="Kill the command after this long (and at the deadline).")


BackendSettings = Annotated[
    Union[LlamaCppSettings, OpenAISettings, GeminiSettings, CustomSettings], Field(discriminator="type")]


# The `type:` values, read off the settings classes above.
BACKEND_TYPES = tuple(get_args(m.model_fields["type"].annotation)[0]
                      for m in get_args(get_args(BackendSettings)[0]))


class WalletSettings(_Strict):
    name: str = Field("default", description="Coldkey name (bittensor --wallet.name).")
    hotkey: str = Field("default", description="Hotkey name (bittensor --wallet.hotkey).")
    path: str = Field("~/.bittensor/wallets", description="Wallets folder (bittensor --wallet.path).")


class SubtensorSettings(_Strict):
    network: str = Field("finney", description="finney, test, local, or a ws:// endpoint.")
    chain_endpoint: str | None = Field(None, description="Explicit endpoint; overrides network.")


class AxonSettings(_Strict):
    port: int = Field(8091, ge=1, le=65535, description="Port the axon listens on.")
    ip: str = Field("0.0.0.0", description="Bind address (offline mode always binds 127.0.0.1).")
    external_ip: str | None = Field(None, description="Public IP served on chain; default: looked up.")
    external_port: int | None = Field(None, ge=1, le=65535, description="Public port; default: port.")


class BlacklistSettings(_Strict):
    require_registered: bool = Field(True, description="Refuse callers whose hotkey is not in the metagraph.")
    require_validator_permit: bool = Field(False, description="Refuse registered callers without a validator permit.")
    min_stake: float = Field(0.0, ge=0, description="Refuse callers with less stake (TAO).")


class OfflineSettings(_Strict):
    allowed_hotkeys: list[str] = Field(default_factory=list, description="ss58 hotkeys allowed in --offline mode.")


class GenerationSettings(_Strict):
    target_s: float = Field(
        25.0, ge=5, le=55, description="Answers are sized to arrive within this (validators give full time marks "
        "up to 30 s); a target, never a reason to abort an answer that can still arrive in time.")
    response_margin_s: float = Field(
        5.0, ge=0.5, le=30, description="The hard limit is the request's own timeout (validators: 60 s) minus "
        "this, kept for the answer's trip back; an answer not done by then is aborted.")
    language: str = Field("auto", description="auto answers in the request's language; or a language name, e.g. English.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling.")
    repeat_penalty: float = Field(1.1, ge=1, le=2, description="Local models: discourages loops; 1.0 is off.")
    max_input_chars: int = Field(2000, ge=10, le=100_000, description="Longest user_input accepted.")
    max_context_chars: int = Field(30_000, ge=1000, le=1_000_000, description="Largest blueprint/characters/story_arc JSON accepted.")
    max_chapters: int = Field(3, ge=1, le=12, description="Most chapter ids answered in one request.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_deadline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "deadline_s" in data:
            if "target_s" in data:
                raise ValueError("deadline_s is the old name of target_s: keep only target_s")
            data = {**data, "target_s": data["deadline_s"]}
            del data["deadline_s"]
            warnings.warn("generation.deadline_s is now generation.target_s (it sizes answers and no longer "
                          "aborts them): rename it in your config", DeprecationWarning, stacklevel=2)
        return data


class ChainSettings(_Strict):
    failures_before_cooldown: int = Field(2, ge=1, le=100, description="Consecutive failures that put a backend on cool-down.")
    cooldown_s: float = Field(60.0, ge=0, le=3600, description="How long a failing backend is skipped before it is probed again.")


class HealthSettings(_Strict):
    port: int = Field(8092, ge=0, le=65535, description="GET /health on 127.0.0.1:port; 0 disables it.")
    interval_s: float = Field(60.0, ge=5, le=3600, description="How often the running miner re-checks its backends.")


class Config(_Strict):
    netuid: int = Field(92, ge=0, le=65535, description="Subnet id (bittensor --netuid).")
    wallet: WalletSettings = Field(default_factory=WalletSettings)
    subtensor: SubtensorSettings = Field(default_factory=SubtensorSettings)
    axon: AxonSettings = Field(default_factory=AxonSettings)
    blacklist: BlacklistSettings = Field(default_factory=BlacklistSettings)
    offline: OfflineSettings = Field(default_factory=OfflineSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    chain: ChainSettings = Field(default_factory=ChainSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    resync_s: float = Field(600.0, ge=30, le=86400, description="How often chain mode resyncs the metagraph.")
    backends: list[BackendSettings] = Field(
        default_factory=lambda: [LlamaCppSettings(type="llama_cpp")],
        min_length=1, description="Tried in this order; the first that can serve answers.")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        # pydantic puts the backend's type tag in the path (backends.0.llama_cpp.n_ctx); the YAML has none.
        loc = e["loc"]
        parts = [p for i, p in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and p in BACKEND_TYPES)]
        dotted = ".".join(str(p) for p in parts if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"  {dotted or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: cannot set inside a non-mapping value")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read YAML (or nothing: defaults), apply dotted overrides from the CLI, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror}); copy config.example.yaml and edit it") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        raw = loaded
        if "generator" in raw:  # the old StoryFi generator format
            from miner.legacy_config import upgrade
            raw = upgrade(raw, source)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
