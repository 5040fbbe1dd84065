"""characters: exactly five people, with fixed ids, each tied to at least two of the others."""
from __future__ import annotations

from typing import Any

from miner.tasks.common import (about, aside, at, check_dict, check_str, check_str_list, const, exact_items, obj,
                                prose, text, texts)
from miner.tasks.task import Task

ROLES = ("protagonist", "ally", "rival", "mentor", "wildcard")
# Whom each character's relationships describe: fixed pairs keep the schema exact and the cast connected.
TIES = {"protagonist": ("ally", "rival"), "ally": ("protagonist", "mentor"),
        "rival": ("protagonist", "wildcard"), "mentor": ("protagonist", "ally"),
        "wildcard": ("protagonist", "rival")}


def instructions(ctx, schema: dict[str, Any]) -> str:
    first = at(schema, "characters", 0)
    return (
        "Create the story's five characters as JSON: {\"characters\": [...]} in the order protagonist, ally, "
        f"rival, mentor, wildcard. Each has id, name, archetype, background ({about(at(first, 'background'))}), "
        f"motivation ({about(at(first, 'motivation'))}), skills, personality_traits and relationships: how they "
        "relate to the named characters. Fit them to the blueprint's world and conflict.")


# The judged prose (what the narrative rules and the judge read: name, background, motivation) has floors
# above the rules' thresholds: 5 x (130 + 70 + a name) is more than the 1,000 characters counted (margin 2%
# with two-letter names, 8% with the usual ones), and 5 backgrounds of 130 characters are more than the
# 100 words fluency counts in English. archetype, skills, traits and relationships are read by no scorer
# (structure counts them): they give up their length first under load.
BACKGROUND, MOTIVATION = (130, 220), (70, 120)
SHORTEST = {"background": 20, "motivation": 10}  # what they may fall to under load: the answer still arrives


def _character(role: str) -> dict[str, Any]:
    return obj(
        id=const(role), name=text(2, 30), archetype=aside(text(3, 30)),
        background=prose(*BACKGROUND, least=SHORTEST["background"]),
        motivation=prose(*MOTIVATION, least=SHORTEST["motivation"]), skills=aside(texts(2, 3, 2, 20)),
        personality_traits=aside(texts(2, 3, 2, 16)),
        relationships=aside(obj(**{other: text(6, 64) for other in TIES[role]})))


def schema(ctx) -> dict[str, Any]:
    return obj(characters=exact_items([_character(role) for role in ROLES]))


def max_tokens(ctx) -> int:
    return 4000


def check(answer: dict, ctx) -> list[str]:
    cast = answer.get("characters")
    if not isinstance(cast, list) or len(cast) != len(ROLES):
        return [f"characters must be a list of exactly {len(ROLES)} objects"]
    problems: list[str] = []
    ids = [c.get("id") if isinstance(c, dict) else None for c in cast]
    if sorted(map(str, ids)) != sorted(ROLES):
        problems.append(f"character ids must be {', '.join(ROLES)}; got {ids}")
    for i, person in enumerate(cast):
        where = f"characters.{i}."
        if not isinstance(person, dict):
            problems.append(f"characters.{i} must be an object")
            continue
        for key in ("id", "name", "archetype", "background", "motivation"):
            check_str(problems, person, key, where=where)
        for key in ("skills", "personality_traits"):
            check_str_list(problems, person, key, where=where)
        if check_dict(problems, person, "relationships", where):
            others = [k for k, v in person["relationships"].items()
                      if k in ROLES and k != person.get("id") and isinstance(v, str) and v.strip()]
            if len(others) < 2:
                problems.append(f"{where}relationships must describe at least 2 other characters by id")
    return problems


class Characters(Task):
    name, needs = "characters", ("blueprint",)
    instructions = staticmethod(instructions)
    schema = staticmethod(schema)
    max_tokens = staticmethod(max_tokens)
    problems = staticmethod(check)
