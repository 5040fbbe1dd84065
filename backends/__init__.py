"""Backends by YAML `type`: one module each, holding its settings, mode, health check and code.

Adding a backend is a new module and a line here. The config reads every module for its settings, so the
API modules import their SDKs only when one of their backends is built (llama.cpp, the default backend,
loads with its module).
"""
from __future__ import annotations

import models  # noqa: F401  (first: it loads llama_cpp before anything loads numpy)

from importlib import import_module  # noqa: E402

from backends.base import Backend, BackendError, BackendSettings

REGISTRY: dict[str, str] = {
    "llama_cpp": "backends.llama_process:LlamaCppProcess",
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


def settings_classes() -> tuple[type[BackendSettings], ...]:
    """Every backend type's settings, in registry order: what a `backends:` entry may be."""
    return tuple(backend_class(name).Settings for name in REGISTRY)


def build_backend(settings: BackendSettings) -> Backend:
    """Make the backend a `backends:` entry describes; raises BackendError naming what is wrong."""
    return backend_class(settings.type).from_settings(settings)  # type: ignore[attr-defined]
