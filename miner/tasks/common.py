"""Pieces every task spec uses: errors, the answer language, schema builders and contract checks."""
from __future__ import annotations

import re
from typing import Any


class TaskInputError(ValueError):
    """The request cannot be served as sent (missing context, oversized input, bad chapter ids)."""


class ContractError(ValueError):
    """A generated answer does not meet the protocol's contract."""


# Scripts that name a language unambiguously; anything else is "the request's language".
_SCRIPTS: list[tuple[str, str]] = [
    (r"[\u3040-\u30ff]", "Japanese"),
    (r"[\uac00-\ud7af]", "Korean"),
    (r"[\u4e00-\u9fff]", "Simplified Chinese"),
    (r"[\u0400-\u04ff]", "Russian"),
    (r"[\u0600-\u06ff]", "Arabic"),
    (r"[\u0900-\u097f]", "Hindi"),
    (r"[\u0e00-\u0e7f]", "Thai"),
]


def detect_language(text: str) -> str | None:
    for pattern, language in _SCRIPTS:
        if re.search(pattern, text):
            return language
    return None


def language_instruction(user_input: str, configured: str) -> str:
    language = configured if configured != "auto" else detect_language(user_input)
    if language:
        return f"Write every text value in {language}; keep JSON keys and ids in English."
    return "Write every text value in the language of the story request; keep JSON keys and ids in English."


# Schema builders: every object lists all its properties as required, in the order they are written.
def text(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "string", "minLength": lo, "maxLength": hi}


def texts(lo_items: int, hi_items: int, lo: int, hi: int) -> dict[str, Any]:
    return {"type": "array", "items": text(lo, hi), "minItems": lo_items, "maxItems": hi_items}


def obj(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def const(value: Any) -> dict[str, Any]:
    return {"const": value}


def exact_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "array", "prefixItems": items, "items": False,
            "minItems": len(items), "maxItems": len(items)}


# Contract checks: each appends a readable problem and returns whether the value passed.
def check_str(problems: list[str], obj: dict, key: str, lo: int = 1, hi: int | None = None, where: str = "") -> bool:
    value = obj.get(key)
    name = f"{where}{key}"
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name} must be a non-empty string")
        return False
    if len(value) < lo or (hi is not None and len(value) > hi):
        problems.append(f"{name} has {len(value)} characters, needs {lo}-{hi or 'any'}")
        return False
    return True


def check_str_list(problems: list[str], obj: dict, key: str, lo: int = 1, hi: int | None = None, where: str = "") -> bool:
    value = obj.get(key)
    name = f"{where}{key}"
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"{name} must be a list of non-empty strings")
        return False
    if len(value) < lo or (hi is not None and len(value) > hi):
        problems.append(f"{name} has {len(value)} items, needs {lo}-{hi or 'any'}")
        return False
    return True


def check_dict(problems: list[str], obj: dict, key: str, where: str = "") -> bool:
    if not isinstance(obj.get(key), dict):
        problems.append(f"{where}{key} must be an object")
        return False
    return True
