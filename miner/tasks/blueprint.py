"""blueprint: the story's world in seven fields."""
from __future__ import annotations

from typing import Any

from miner.tasks.common import about, at, check_str, check_str_list, obj, text, texts

# (field, min chars, max chars): the contract's bounds where it sets them, sane ones elsewhere.
BOUNDS = {"title": (2, 60), "genre": (2, 40), "setting": (50, 300), "core_conflict": (30, 200),
          "tone": (2, 60), "target_audience": (2, 80)}


def instructions(ctx, schema: dict[str, Any]) -> str:
    return (
        "Design the blueprint of this story as JSON with: title; genre; setting (the world, place and era, "
        f"{about(at(schema, 'setting'))}); core_conflict (the central struggle, "
        f"{about(at(schema, 'core_conflict'))}); themes (short themes); tone; target_audience.")


def schema(ctx) -> dict[str, Any]:
    return obj(
        title=text(2, 60), genre=text(2, 40), setting=text(50, 299), core_conflict=text(30, 199),
        themes=texts(2, 4, 2, 40), tone=text(2, 60), target_audience=text(2, 80))


def max_tokens(ctx) -> int:
    return 1200


def check(answer: dict, ctx) -> list[str]:
    problems: list[str] = []
    for key, (lo, hi) in BOUNDS.items():
        check_str(problems, answer, key, lo, hi)
    check_str_list(problems, answer, "themes", 2, 5)
    return problems
