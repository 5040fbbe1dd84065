"""story_arc: twelve chapters in four acts of three, with progress rising to 1.0."""
from __future__ import annotations

from typing import Any

from miner.tasks.common import about, aside, at, check_dict, check_str, const, exact_items, obj, prose, text, texts
from miner.tasks.task import Task

N_CHAPTERS = 12
ACTS = {"act1": [1, 2, 3], "act2a": [4, 5, 6], "act2b": [7, 8, 9], "act3": [10, 11, 12]}


def progress(chapter_id: int) -> float:
    return round(chapter_id / N_CHAPTERS, 2)


def instructions(ctx, schema: dict[str, Any]) -> str:
    return (
        f"Plan the story arc as JSON: title; description (the whole story, {about(at(schema, 'description'))}); "
        f"chapters: 12 chapters, each with id, a title and a description of what happens "
        f"({about(at(schema, 'chapters', 0, 'description'))}), rising toward "
        "the climax in chapters 10-11 and resolving in 12; arcs: act1 (chapters 1-3, setup), act2a (4-6, "
        "rising stakes), act2b (7-9, reversal), act3 (10-12, climax and resolution), each with a title; "
        "themes: the primary theme and how it develops; hooks: the opening hook and the cliffhanger.")


# The judged prose is the chapters' titles and descriptions (what the narrative rules, fluency and the
# judge read): 12 x (85 + a title) is more than the 1,000 characters the rules count (margin 7%), and twelve
# descriptions of 85 characters more than the 100 words fluency counts in English. The story's own title
# and description, the acts' titles, themes and hooks are read by no scorer: they give up their length
# first under load.
DESCRIPTION = (85, 160)
DESCRIPTION_LEAST = 10  # what a description may fall to under load: the answer still arrives


def _chapter(chapter_id: int) -> dict[str, Any]:
    return obj(id=const(chapter_id), title=text(2, 40),
               description=prose(*DESCRIPTION, least=DESCRIPTION_LEAST), storyProgress=const(progress(chapter_id)))


def schema(ctx) -> dict[str, Any]:
    return obj(
        title=aside(text(2, 60)), description=aside(prose(30, 300)),
        chapters=exact_items([_chapter(i) for i in range(1, N_CHAPTERS + 1)]),
        arcs=aside(obj(**{act: obj(title=text(2, 40), chapters=const(ids)) for act, ids in ACTS.items()})),
        themes=aside(obj(primary=text(2, 40), development=prose(10, 200), secondary=texts(1, 3, 2, 40))),
        hooks=aside(obj(opening=prose(10, 160), cliffhanger=prose(10, 160))))


def max_tokens(ctx) -> int:
    return 4000


def _check_chapters(chapters: Any) -> list[str]:
    if not isinstance(chapters, list) or len(chapters) != N_CHAPTERS:
        return [f"chapters must be a list of exactly {N_CHAPTERS} objects"]
    problems: list[str] = []
    last = 0.0
    for i, chapter in enumerate(chapters, start=1):
        if not isinstance(chapter, dict):
            problems.append(f"chapters.{i - 1} must be an object")
            continue
        if chapter.get("id") != i:
            problems.append(f"chapters.{i - 1}.id must be {i}")
        check_str(problems, chapter, "title", where=f"chapters.{i - 1}.")
        check_str(problems, chapter, "description", where=f"chapters.{i - 1}.")
        value = chapter.get("storyProgress")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not last < value <= 1.0:
            problems.append(f"chapters.{i - 1}.storyProgress must rise strictly, up to 1.0")
        else:
            last = float(value)
    return problems


def _check_arcs(arcs: Any) -> list[str]:
    if not isinstance(arcs, dict):
        return ["arcs must be an object"]
    problems: list[str] = []
    for act in ACTS:
        ids = arcs.get(act, {}).get("chapters") if isinstance(arcs.get(act), dict) else None
        if not (isinstance(ids, list) and len(ids) == 3 and all(isinstance(x, int) for x in ids)):
            problems.append(f"arcs.{act}.chapters must list exactly 3 chapter ids")
    return problems


def check(answer: dict, ctx) -> list[str]:
    problems: list[str] = []
    check_str(problems, answer, "title")
    check_str(problems, answer, "description")
    problems += _check_chapters(answer.get("chapters"))
    problems += _check_arcs(answer.get("arcs"))
    check_dict(problems, answer, "themes")
    check_dict(problems, answer, "hooks")
    return problems


class StoryArc(Task):
    name, needs = "story_arc", ("blueprint", "characters")
    instructions = staticmethod(instructions)
    schema = staticmethod(schema)
    max_tokens = staticmethod(max_tokens)
    problems = staticmethod(check)
