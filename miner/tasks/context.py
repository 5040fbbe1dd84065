"""What of the earlier answers goes into a prompt: what later tasks build on, not every word.

Prompt tokens are not free: on 2 CPU cores the demo model reads about 200-250 of them a second, so
a whole chained characters + story_arc context (2000+ tokens) would eat half the deadline.
"""
from __future__ import annotations

import json
from typing import Any, Callable

CHARACTER_KEYS = ("id", "name", "archetype", "motivation")
CHAPTER_KEYS = ("id", "title")


def _pick(item: Any, keys: tuple[str, ...]) -> Any:
    return {k: item[k] for k in keys if k in item} if isinstance(item, dict) else item


def _characters(cast: list[dict[str, Any]]) -> list[Any]:
    return [_pick(c, CHARACTER_KEYS) for c in cast]


def _story_arc(value: dict[str, Any]) -> dict[str, Any]:
    chapters = value.get("chapters")
    if not isinstance(chapters, list):
        return value
    # The chapters task names its own chapters' descriptions in its instructions.
    return {"title": value.get("title"), "description": value.get("description"),
            "chapters": [_pick(c, CHAPTER_KEYS) for c in chapters]}


DIGESTS: dict[str, Callable[[Any], Any]] = {"characters": _characters, "story_arc": _story_arc}
# What a prompt says of a context that came empty (3.2.1 sends every chapters request an empty cast).
WHEN_EMPTY = {"characters": "no cast is given: create the named characters this story needs and keep their names "
                            "the same throughout."}
# What a prompt says of a context that came filled.
WHEN_GIVEN = {"characters": "keep these characters and their names exactly as given"}


def digest(field: str, value: Any) -> Any:
    return DIGESTS.get(field, lambda v: v)(value)


def context_part(field: str, value: Any) -> str:
    """The prompt's paragraph about one context field."""
    if not value:
        return f"{field}: {WHEN_EMPTY.get(field, 'none given.')}"
    note = f" ({WHEN_GIVEN[field]})" if field in WHEN_GIVEN else ""
    return f"{field} so far{note}:\n{json.dumps(digest(field, value), ensure_ascii=False)}"
