"""The old StoryFi generator config, mapped onto `backends:`.

The old design chose one `generator.mode` (local, vllm, api or custom) and fell back to one other mode
when it could not load (local -> api, api -> local, vllm -> local, custom -> api). Here that becomes an
ordered `backends:` list. A miner can point this miner at its old file: it is read, mapped, and the
equivalent new YAML is logged once, with a note for every old key that has no direct equivalent.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import yaml

from miner.errors import ConfigError
from models import catalog

log = logging.getLogger(__name__)

MODES = ("local", "vllm", "api", "custom")
FALLBACK = {"local": "api", "api": "local", "vllm": "local", "custom": "api"}  # the old loader's order
DROPPED = {
    "use_templates": "prompts are built in (miner/tasks); old prompt templates are not used",
    "template_dir": "prompts are built in (miner/tasks); old prompt templates are not used",
}
_shown: set[str] = set()


def _local(old: dict[str, Any], notes: list[str], section: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "llama_cpp"}
    repo = old.get("model_name")
    known = next((m for m in catalog.MODELS.values() if repo and m.source_repo.lower() == repo.lower()), None)
    if known is not None:
        entry["model_path"] = f"models/{known.quant('Q4_K_M').files[0]}"
        notes.append(f"{section}.model_name {repo}: the miner runs its Q4 GGUF in llama.cpp; get it with "
                     f"`.venv/bin/storynet-miner download {known.name} --dir models`")
    elif repo:
        entry["model_path"] = f"models/{repo.split('/')[-1]}-Q4_K_M.gguf"
        notes.append(f"{section}.model_name {repo}: not in the catalog; make its Q4 GGUF with "
                     f"`.venv/bin/storynet-miner convert {repo} --out {entry['model_path']}`")
    if old.get("device") == "cpu":
        entry["n_gpu_layers"] = 0
    if old.get("max_memory"):
        notes.append(f"{section}.max_memory: dropped; n_gpu_layers: auto plans from the GPU's free memory "
                     f"(set vram_gb to cap it)")
    return entry


def _api(old: dict[str, Any], notes: list[str], section: str) -> dict[str, Any] | None:
    provider, endpoint = old.get("provider", "openai"), old.get("endpoint")
    if provider == "gemini":
        if endpoint:
            notes.append(f"{section}.endpoint: ignored for gemini, as the old generator did")
        return {"type": "gemini", "model": old.get("model") or "gemini-2.0-flash",
                "api_key_env": old.get("api_key_env") or "GEMINI_API_KEY"}
    if provider not in ("openai", "custom") and not endpoint:
        notes.append(f"{section}.provider {provider}: not supported; use openai, gemini, or an OpenAI-compatible "
                     f"endpoint")
        return None
    entry = {"type": "openai", "model": old.get("model") or "gpt-4o-mini",
             "api_key_env": old.get("api_key_env") or "OPENAI_API_KEY"}
    if endpoint:
        entry["base_url"] = endpoint
    return entry


def _custom(old: dict[str, Any], notes: list[str], section: str) -> dict[str, Any] | None:
    if not old.get("script_path"):
        if old.get("endpoint"):
            notes.append(f"{section}.endpoint: an HTTP generator has no equivalent; serve it behind an "
                         f"OpenAI-compatible API (type: openai, base_url) or wrap it in a command")
        return None
    notes.append(f"{section}.script_path: the command now reads {{messages, schema, max_tokens, ...}} on stdin "
                 f"and prints {{\"text\": ...}} (see docs/backends.md); update the script")
    if old.get("env_vars"):
        notes.append(f"{section}.env_vars: set these in the miner's environment instead")
    return {"type": "custom", "command": [old["script_path"]],
            "timeout_s": min(float(old.get("timeout") or 25), 120.0)}


BUILDERS: dict[str, Callable[[dict[str, Any], list[str], str], dict[str, Any] | None]] = {
    "local": _local, "vllm": _local, "api": _api, "custom": _custom}


def map_generator(generator: Any, source: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The old `generator:` mapping -> (backends list, notes for the operator)."""
    if not isinstance(generator, dict):
        raise ConfigError(f"{source}: generator must be a mapping (the old StoryFi generator format)")
    mode = generator.get("mode", "api")
    if mode not in MODES:
        raise ConfigError(f"{source}: generator.mode {mode!r} is not one of {', '.join(MODES)}")
    notes = [f"generator.{key}: {why}" for key, why in DROPPED.items() if key in generator]
    backends: list[dict[str, Any]] = []
    for i, section in enumerate((mode, FALLBACK[mode])):
        if i > 0 and section not in generator:  # a fallback the old file never configured
            continue
        old = generator.get(section) or {}
        entry = BUILDERS[section](old, notes, f"generator.{section}")
        if entry is not None and entry not in backends:
            backends.append(entry)
    if not backends:
        raise ConfigError(f"{source}: the old generator config maps onto no backend:\n  " + "\n  ".join(notes))
    return backends, notes


def upgrade(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Replace `generator:` with the equivalent `backends:`; log the new YAML the first time."""
    if "backends" in raw:
        raise ConfigError(f"{source}: has both the old `generator:` and the new `backends:`; keep only backends")
    rest = {k: v for k, v in raw.items() if k != "generator"}
    backends, notes = map_generator(raw["generator"], source)
    new = {**rest, "backends": backends}
    if source not in _shown:
        _shown.add(source)
        text = yaml.safe_dump(new, sort_keys=False, allow_unicode=True)
        log.warning("%s uses the old StoryFi generator format; it is read as the YAML below. Save that as your "
                    "config to silence this message.\n%s%s", source, text,
                    "".join(f"note: {n}\n" for n in notes))
    return new
