"""Typed configuration: YAML validated into these models, CLI flags on top.

Every field has bounds and a description; a wrong key or value fails at start with a message that
names the key, e.g. `backends.0.n_ctx: Input should be greater than or equal to 512`.
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from bittensor_wallet.utils import is_valid_ss58_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends import REGISTRY, backend_class, settings_classes
from backends.llama_cpp import LlamaCppSettings
from models import default_models_dir
from miner.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A `backends:` entry is the settings of the backend type it names (each backend module holds its own).
BackendSettings = Annotated[Union[settings_classes()], Field(discriminator="type")]  # type: ignore[valid-type]
BACKEND_TYPES = tuple(REGISTRY)
# `type:` values people write for servers the openai type already covers.
OPENAI_COMPATIBLE = "use type: openai, which talks to any OpenAI-compatible server"
TYPE_HINTS = {
    "ollama": f"{OPENAI_COMPATIBLE}, with base_url: http://127.0.0.1:11434/v1 (ollama's) and model: the name "
              "`ollama list` shows; api_key_env: null",
    "vllm": f"{OPENAI_COMPATIBLE}, with base_url: http://HOST:8000/v1 (vLLM's) and api_key_env: null",
}


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
    force_allow: list[str] = Field(
        default_factory=list, description="ss58 hotkeys let through in chain mode whatever the rules above say "
        "(yours, to try the live miner); their priority is still their stake.")

    @field_validator("force_allow")
    @classmethod
    def _ss58(cls, hotkeys: list[str]) -> list[str]:
        bad = [h for h in hotkeys if not is_valid_ss58_address(h)]
        if bad:
            raise ValueError(f"not ss58 hotkey addresses: {', '.join(map(repr, bad))}")
        return hotkeys


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
    repeat_penalty: float = Field(1.1, ge=1, le=2, description="Local models: the last 64 tokens made less likely "
                                  "(punctuation and line breaks exempt); 1.0 is off.")
    dry_multiplier: float = Field(0.8, ge=0, le=5, description="Local models: llama.cpp's DRY sampler, how hard a "
                                  "token that would repeat a phrase already written is pushed down; 0 is off.")
    dry_base: float = Field(1.75, ge=1, le=4, description="DRY: how fast the push grows with the repeat's length.")
    dry_allowed_length: int = Field(2, ge=1, le=20, description="DRY: repeats this many tokens long go free.")
    dry_last_n: int = Field(1024, ge=-1, le=65536, description="DRY: tokens of the answer it looks back over "
                            "(-1: the whole context).")
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
    models_dir: str = Field(default_factory=default_models_dir, description="Where `download` puts GGUF files "
                            "(backends' model_path may point anywhere, the repository's models/ included).")
    wallet: WalletSettings = Field(default_factory=WalletSettings)
    subtensor: SubtensorSettings = Field(default_factory=SubtensorSettings)
    axon: AxonSettings = Field(default_factory=AxonSettings)
    blacklist: BlacklistSettings = Field(default_factory=BlacklistSettings)
    offline: OfflineSettings = Field(default_factory=OfflineSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    chain: ChainSettings = Field(default_factory=ChainSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    resync_s: float = Field(600.0, ge=30, le=86400, description="How often chain mode resyncs the metagraph.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=300, description="On SIGTERM or SIGINT: how long requests in flight may take to finish "
        "before they are failed with an explicit error. Keep pm2's kill_timeout and systemd's TimeoutStopSec "
        "above it.")
    allow_demo_model_on_chain: bool = Field(
        False, description="Let `run` on the chain answer validators with the embedded demo model (a llama_cpp "
        "backend without model_path); without it, chain mode refuses to start with it. Offline and demo always may.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level (to stderr); the --log-level flag overrides it.")
    backends: list[BackendSettings] = Field(
        default_factory=lambda: [LlamaCppSettings(type="llama_cpp")],  # the embedded demo model
        min_length=1, description="Tried in this order; the first that can serve answers.")


def _keys_beside(loc: tuple) -> list[str]:
    """The keys the YAML may have where an error's location ends (for "did you mean")."""
    if len(loc) >= 4 and loc[0] == "backends" and loc[2] in REGISTRY:  # backends.N.<type tag>.key
        return list(backend_class(loc[2]).Settings.model_fields)
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _hint(e: dict[str, Any]) -> str:
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(e["loc"][-1]), _keys_beside(e["loc"]), n=1)
        return f"; did you mean {close[0]}?" if close else ""
    if e["type"] == "union_tag_invalid":
        tag = str(e["ctx"]["tag"])
        close = difflib.get_close_matches(tag, BACKEND_TYPES, n=1)
        hint = TYPE_HINTS.get(tag.lower()) or (f"did you mean {close[0]}?" if close else "")
        return f"; {hint}" if hint else ""
    return ""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        # pydantic puts the backend's type tag in the path (backends.0.llama_cpp.n_ctx); the YAML has none.
        loc = e["loc"]
        parts = [p for i, p in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and p in BACKEND_TYPES)]
        dotted = ".".join(str(p) for p in parts if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"  {dotted or '(top level)'}: {e['msg']}{_hint(e)}")
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
