"""Backends by YAML `type`. Modules load lazily so an unused SDK is never imported."""
from __future__ import annotations

from importlib import import_module

from backends.base import Backend, BackendError

REGISTRY: dict[str, str] = {
    "llama_cpp": "backends.llama_cpp:LlamaCppBackend",
    "openai": "backends.openai_api:OpenAIBackend",
    "gemini": "backends.gemini_api:GeminiBackend",
    "custom": "backends.custom_command:CustomCommandBackend",
}


def backend_class(type_name: str) -> type[Backend]:
    try:
        module_name, cls_name = REGISTRY[type_name].split(":")
    except KeyError:
        raise BackendError(f"unknown backend type {type_name!r}; known: {', '.join(REGISTRY)}") from None
    return getattr(import_module(module_name), cls_name)


def build_backend(settings) -> Backend:
    """Make the backend a `backends:` entry describes; raises BackendError naming what is wrong."""
    return backend_class(settings.type).from_settings(settings)
