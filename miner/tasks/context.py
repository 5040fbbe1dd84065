"""What of the earlier answers goes into a prompt: what later tasks build on, not every word.

Prompt tokens are not free: on 2 CPU cores the demo model reads about 200-250 of them a second, so
a whole chained characters + story_arc context (2000+ tokens) would eat half the deadline.
"""
from __future__ import annotations

from typing import Any, Callable

CHARACTER_KEYS = ("id", "name", "archetype", "motivation")
CHAPTER_KEYS = ("id", "title")


def _pick(item: Any, keys: tuple[str, ...]) -> Any:
    return {k: item[k] for k in keys if k in item} if isinstance(item, dict) else item


def _characters(value: dict[str, Any]) -> dict[str, Any]:
    cast = value.get("characters")
    if not isinstance(cast, list):
        return value  # an unexpected shape goes in whole; its size was capped on the way in
    return {"characters": [_pick(c, CHARACTER_KEYS) for c in cast]}


def _story_arc(value: dict[str, Any]) -> dict[str, Any]:
    chapters = value.get("chapters")
    if not isinstance(chapters, list):
        return value
    # The chapters task names its own chapters' descriptions in its instructions.
    return {"title": value.get("title"), "description": value.get("description"),
            "chapters": [_pick(c, CHAPTER_KEYS) for c in chapters]}


DIGESTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "characters": _characters, "story_arc": _story_arc}


def digest(field: str, value: dict[str, Any]) -> dict[str, Any]:
    return DIGESTS.get(field, lambda v: v)(value)
