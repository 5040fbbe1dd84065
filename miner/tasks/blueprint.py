"""blueprint: the story's world in seven fields."""
from __future__ import annotations

from typing import Any

from miner.tasks.common import about, at, check_str, check_str_list, obj, text, texts
from miner.tasks.task import Task

# Characters of each field: the contract's bounds where it sets them, sane ones elsewhere. The schema and
# the check both read these.
BOUNDS = {"title": (2, 60), "genre": (2, 40), "setting": (50, 300), "core_conflict": (30, 200),
          "tone": (2, 60), "target_audience": (2, 80)}
THEMES = (2, 5)  # items, each of THEME characters
THEME = (2, 40)


def instructions(ctx, schema: dict[str, Any]) -> str:
    return (
        "Design the blueprint of this story as JSON with: title; genre; setting (the world, place and era, "
        f"{about(at(schema, 'setting'))}); core_conflict (the central struggle, "
        f"{about(at(schema, 'core_conflict'))}); themes (short themes); tone; target_audience.")


def schema(ctx) -> dict[str, Any]:
    fields = {key: text(*BOUNDS[key]) for key in ("title", "genre", "setting", "core_conflict")}
    fields["themes"] = texts(*THEMES, *THEME)
    fields.update({key: text(*BOUNDS[key]) for key in ("tone", "target_audience")})
    return obj(**fields)


def max_tokens(ctx) -> int:
    return 1200


def check(answer: dict, ctx) -> list[str]:
    problems: list[str] = []
    for key, (lo, hi) in BOUNDS.items():
        check_str(problems, answer, key, lo, hi)
    check_str_list(problems, answer, "themes", *THEMES)
    return problems


class Blueprint(Task):
    name, needs = "blueprint", ()
    instructions = staticmethod(instructions)
    schema = staticmethod(schema)
    max_tokens = staticmethod(max_tokens)
    problems = staticmethod(check)
