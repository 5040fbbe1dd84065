"""chapters: the full text of the requested chapters, each ending in choices for the reader."""
from __future__ import annotations

import json
from typing import Any

from miner.tasks.common import about, aside, at, check_dict, check_str, const, obj, prose, text
from miner.tasks.task import Task

CONTENT = (1000, 3000)  # the contract's bounds, in characters
CHOICE_IDS = ("A", "B", "C")
# The model writes a chapter as 3 to 5 paragraphs, each a JSON string that ends on a full sentence; the task
# joins them with a blank line into the contract's `content`. Paragraphs by construction: a small model
# asked for blank lines inside one long string writes one paragraph. The floor, 3 x 350 characters and two
# blank lines, is past the 1,000 the contract and the rules count (margin 5%); the ceiling, 5 x 470 and four
# blank lines (2,358), stays well inside the contract's 3,000 and the time a 6 GB card has.
PARAGRAPHS, PARAGRAPH = (3, 5), (350, 470)
PARAGRAPH_LEAST = 334  # under load: 3 x 334 and two blank lines still make the contract's 1,000
SEPARATOR = "\n\n"


def _planned(ctx, chapter_id: int) -> str:
    """The story arc's line for this chapter, if it has one (3.2.1's mock arc lists bare ids)."""
    chapters = (ctx.story_arc or {}).get("chapters")
    for chapter in chapters if isinstance(chapters, list) else []:
        if isinstance(chapter, dict) and chapter.get("id") == chapter_id:
            line = ": ".join(str(chapter[k]) for k in ("title", "description") if chapter.get(k))
            if line:
                return line
    return "the opening of the story" if chapter_id == 1 else "the next step of the story"


def instructions(ctx, schema: dict[str, Any]) -> str:
    plans = "\n".join(f"- chapter {i}: {_planned(ctx, i)}" for i in ctx.chapter_ids)
    paragraphs = at(schema, "chapters", 0, "paragraphs")
    return (
        "Write these chapters of the story as JSON {\"chapters\": [...]}:\n" + plans + "\n"
        "Each chapter has id, title, paragraphs and choices. paragraphs are the chapter itself, "
        f"{paragraphs['minItems']} to {paragraphs['maxItems']} paragraphs of prose, each one JSON string of "
        f"{about(paragraphs['items'])} that ends on a full sentence: scenes with action and feeling; the "
        "characters by name, speaking in quoted dialogue; short and long sentences mixed; no phrase said twice. "
        "choices are 2 or 3 decisions the reader can take at the end, each with id, text, and consequences (an "
        "object whose outcome says what that choice leads to; every choice leads somewhere different).")


def _choice(choice_id: str) -> dict[str, Any]:
    return obj(id=const(choice_id), text=text(5, 100), consequences=obj(outcome=text(20, 160)))


def _chapter(chapter_id: int) -> dict[str, Any]:
    # The judge and the rules read the content only: the title and the choices (counted by structure) give
    # up their length first under load, the optional third choice first of all.
    return obj(
        id=const(chapter_id), title=aside(text(2, 60)),
        paragraphs={"type": "array", "items": prose(*PARAGRAPH, least=PARAGRAPH_LEAST),
                    "minItems": PARAGRAPHS[0], "maxItems": PARAGRAPHS[1]},
        choices=aside({"type": "array", "prefixItems": [_choice(c) for c in CHOICE_IDS], "items": False,
                       "minItems": 2, "maxItems": len(CHOICE_IDS)}))


def schema(ctx) -> dict[str, Any]:
    items = [_chapter(i) for i in ctx.chapter_ids]
    return obj(chapters={"type": "array", "prefixItems": items, "items": False,
                         "minItems": len(items), "maxItems": len(items)})


def max_tokens(ctx) -> int:
    return 5000 * len(ctx.chapter_ids)


def to_contract(answer: dict[str, Any]) -> dict[str, Any]:
    """The contract's chapters: each chapter's paragraphs joined into its content, where the model wrote
    paragraphs (an API may have written content itself)."""
    chapters = answer.get("chapters")
    if not isinstance(chapters, list):
        return answer
    joined = []
    for chapter in chapters:
        paragraphs = chapter.get("paragraphs") if isinstance(chapter, dict) else None
        if isinstance(paragraphs, list) and all(isinstance(p, str) for p in paragraphs) and "content" not in chapter:
            content = SEPARATOR.join(p.strip() for p in paragraphs)
            chapter = {("content" if k == "paragraphs" else k): (content if k == "paragraphs" else v)
                       for k, v in chapter.items()}
        joined.append(chapter)
    return {**answer, "chapters": joined}


def _check_choices(choices: Any, where: str) -> list[str]:
    if not isinstance(choices, list) or not 2 <= len(choices) <= 4:
        return [f"{where}choices must be a list of 2-4 objects"]
    problems: list[str] = []
    for j, choice in enumerate(choices):
        if not isinstance(choice, dict):
            problems.append(f"{where}choices.{j} must be an object")
            continue
        check_str(problems, choice, "text", where=f"{where}choices.{j}.")
        if choice.get("id") in (None, ""):
            problems.append(f"{where}choices.{j}.id is missing")
        check_dict(problems, choice, "consequences", f"{where}choices.{j}.")
    if _repeated_consequence(choices) is not None:
        problems.append(f"{where}choices must have different consequences")
    return problems


def _repeated_consequence(choices: list) -> int | None:
    """The position of the first choice whose consequences repeat an earlier choice's."""
    seen = set()
    for j, choice in enumerate(choices):
        if isinstance(choice, dict):
            outcome = json.dumps(choice.get("consequences"), sort_keys=True, ensure_ascii=False)
            if outcome in seen:
                return j
            seen.add(outcome)
    return None


def retry_path(answer: dict, ctx) -> list[str | int] | None:
    """Where a retry starts over: the first repeated consequences, when nothing else is wrong. Answers from
    APIs need not have the schema's shape: anything else gets a whole retry (None)."""
    chapters = answer.get("chapters")
    for i, chapter in enumerate(chapters if isinstance(chapters, list) else []):
        choices = chapter.get("choices") if isinstance(chapter, dict) else None
        j = _repeated_consequence(choices) if isinstance(choices, list) else None
        if j is not None:
            return ["chapters", i, "choices", j, "consequences"]
    return None


def check(answer: dict, ctx) -> list[str]:
    chapters = answer.get("chapters")
    if not isinstance(chapters, list) or len(chapters) != len(ctx.chapter_ids):
        return [f"chapters must be a list of {len(ctx.chapter_ids)} objects, one per requested id"]
    problems: list[str] = []
    for i, (chapter, wanted) in enumerate(zip(chapters, ctx.chapter_ids)):
        where = f"chapters.{i}."
        if not isinstance(chapter, dict):
            problems.append(f"chapters.{i} must be an object")
            continue
        if chapter.get("id") != wanted:
            problems.append(f"{where}id must be {wanted}")
        check_str(problems, chapter, "title", where=where)
        check_str(problems, chapter, "content", *CONTENT, where=where)
        problems += _check_choices(chapter.get("choices"), where)
    return problems


class Chapters(Task):
    name, needs = "chapters", ("blueprint", "characters", "story_arc", "chapter_ids")
    instructions = staticmethod(instructions)
    schema = staticmethod(schema)
    max_tokens = staticmethod(max_tokens)
    problems = staticmethod(check)
    retry_path = staticmethod(retry_path)
    to_contract = staticmethod(to_contract)
