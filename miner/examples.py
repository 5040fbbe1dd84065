"""A built-in example context, shaped like the small fixed objects validators send with a request,
for `generate` without --context and for tests. It is input to the model, never an answer."""
from __future__ import annotations

import copy
import random
from typing import Any

from miner import PROTOCOL_VERSION
from miner.tasks.characters import ROLES
from miner.tasks.story_arc import progress

# Validators send short Chinese prompts like "一个关于太空探险的故事"; the example asks the same in English,
# the language the embedded demo model (SmolLM2-135M) writes well and in the fewest tokens.
USER_INPUT = "A story about a space expedition"

BLUEPRINT: dict[str, Any] = {
    "title": "The Silent Relay",
    "genre": "science fiction",
    "setting": "A mining convoy drifting through the outer asteroid belt in 2291, where the relay stations "
               "that once linked it to Earth have gone quiet one by one.",
    "core_conflict": "A young navigator must decide whether to trust a signal from a dead station or the "
                     "convoy captain who wants it ignored.",
    "themes": ["trust", "isolation", "the cost of discovery"],
    "tone": "tense and wondering",
    "target_audience": "young adults and adult readers of space adventure",
}

_CAST = [
    ("protagonist", "Lin Yao", "the reluctant hero"),
    ("ally", "Okoro Dale", "the loyal engineer"),
    ("rival", "Captain Mara Venn", "the hard-line commander"),
    ("mentor", "Old Teodor", "the retired relay keeper"),
    ("wildcard", "ECHO", "the station AI of unknown loyalty"),
]
CHARACTERS: list[dict[str, Any]] = [
    {"id": cid, "name": name, "archetype": archetype,
     "background": f"{name} has spent years aboard the convoy.", "motivation": "to bring the convoy home",
     "skills": ["navigation"], "personality_traits": ["stubborn"],
     "relationships": {other: "crewmate" for other, _, _ in _CAST if other != cid}}
    for cid, name, archetype in _CAST]

STORY_ARC: dict[str, Any] = {
    "title": "The Silent Relay",
    "description": "A navigator follows a signal from a dead relay station into the dark.",
    "chapters": [{"id": i, "title": f"Chapter {i}", "description": f"The convoy's journey, step {i}.",
                  "storyProgress": progress(i)} for i in range(1, 13)],
    "arcs": {"act1": {"chapters": [1, 2, 3]}, "act2a": {"chapters": [4, 5, 6]},
             "act2b": {"chapters": [7, 8, 9]}, "act3": {"chapters": [10, 11, 12]}},
    "themes": {"primary": "trust"},
    "hooks": {"opening": "A dead station starts to speak."},
}

CHAPTER_IDS = [1]


def cast_as(protocol: str, cast: list[dict[str, Any]]) -> Any:
    """The cast as a validator of that protocol version sends it: 3.2.1 a bare list, 3.2.0 wrapped."""
    return {"characters": cast} if protocol == "3.2.0" else cast


def example_fields(task_type: str, user_input: str = USER_INPUT, protocol: str = PROTOCOL_VERSION) -> dict[str, Any]:
    """Request fields for task_type with the example context filled in."""
    return {"task_type": task_type, "user_input": user_input, "blueprint": BLUEPRINT,
            "characters": cast_as(protocol, CHARACTERS), "story_arc": STORY_ARC, "chapter_ids": CHAPTER_IDS,
            "protocol_version": protocol}


# The subnet's validators, as they query today (docs/protocol.md): one of eight Chinese prompts,
# a task drawn 40/25/25/10 from the block number, and the same small fixed mock context every time, in
# English since 3.2.1 (3.2.0 sent the same shapes in Chinese, the cast wrapped in an object).
VALIDATOR_PROMPTS = ("一个关于赛博朋克黑客的故事", "一个关于太空探险的故事", "一个古代武侠传奇故事",
                     "一个末日生存的故事", "一个都市悬疑推理故事", "一个奇幻魔法世界的故事", "一个时间旅行的故事",
                     "一个AI觉醒的故事")
VALIDATOR_TASK_WEIGHTS = {"blueprint": 0.40, "characters": 0.25, "story_arc": 0.25, "chapters": 0.10}
_MOCKS = {  # per protocol: (blueprint, [(name, archetype) per role, in ROLES order])
    "3.2.1": ({"title": "Sample Story", "genre": "Sci-Fi", "setting": "Future World", "core_conflict": "Human vs AI",
               "themes": ["Technology", "Ethics"], "tone": "Suspenseful", "target_audience": "Adults"},
              [("Hero", "Hero"), ("Ally", "Helper"), ("Rival", "Villain"), ("Mentor", "Sage"),
               ("Wildcard", "Mystery")]),
    "3.2.0": ({"title": "测试故事", "genre": "科幻", "setting": "未来世界", "core_conflict": "人与AI的冲突",
               "themes": ["科技", "伦理"], "tone": "紧张", "target_audience": "成人"},
              [("主角", "英雄"), ("盟友", "助手"), ("对手", "反派"), ("导师", "智者"), ("变数", "神秘人")]),
}


def validator_fields(task_type: str, user_input: str, protocol: str = PROTOCOL_VERSION) -> dict[str, Any]:
    """Request fields exactly as that protocol's validators send them (a fresh dict: callers may change it)."""
    blueprint, people = copy.deepcopy(_MOCKS[protocol])
    cast = [{"id": role, "name": name, "archetype": archetype} for role, (name, archetype) in zip(ROLES, people)]
    title = {"title": blueprint["title"]}
    context = {
        "blueprint": {},
        "characters": {"blueprint": blueprint},
        "story_arc": {"blueprint": blueprint, "characters": cast_as(protocol, cast)},
        "chapters": {"blueprint": title, "characters": cast_as(protocol, []),
                     "story_arc": {**title, "chapters": [{"id": i} for i in range(1, 13)]}, "chapter_ids": [1]},
    }[task_type]
    return {"task_type": task_type, "user_input": user_input, "protocol_version": protocol, **context}


def validator_task(block: int) -> tuple[str, str]:
    """(task, prompt) that every 3.2.1 validator picks at this block: seeded by the block number."""
    tasks, weights = zip(*VALIDATOR_TASK_WEIGHTS.items())
    return (random.Random(block).choices(tasks, weights=weights)[0],
            random.Random(block + 1000).choice(VALIDATOR_PROMPTS))
