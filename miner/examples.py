"""A built-in example context, shaped like the small fixed objects validators send with a request,
for `generate` without --context and for tests. It is input to the model, never an answer."""
from __future__ import annotations

import copy
from typing import Any

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
CHARACTERS: dict[str, Any] = {"characters": [
    {"id": cid, "name": name, "archetype": archetype,
     "background": f"{name} has spent years aboard the convoy.", "motivation": "to bring the convoy home",
     "skills": ["navigation"], "personality_traits": ["stubborn"],
     "relationships": {other: "crewmate" for other, _, _ in _CAST if other != cid}}
    for cid, name, archetype in _CAST]}

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


def example_fields(task_type: str, user_input: str = USER_INPUT) -> dict[str, Any]:
    """Request fields for task_type with the example context filled in."""
    return {"task_type": task_type, "user_input": user_input, "blueprint": BLUEPRINT,
            "characters": CHARACTERS, "story_arc": STORY_ARC, "chapter_ids": CHAPTER_IDS}


# The subnet's validators, as they query today (../shared/spec/protocol.md): one of eight Chinese prompts,
# a task drawn 40/25/25/10, and the same small fixed mock context every time.
VALIDATOR_PROMPTS = ("一个关于赛博朋克黑客的故事", "一个关于太空探险的故事", "一个古代武侠传奇故事",
                     "一个末日生存的故事", "一个都市悬疑推理故事", "一个奇幻魔法世界的故事", "一个时间旅行的故事",
                     "一个AI觉醒的故事")
VALIDATOR_TASK_WEIGHTS = {"blueprint": 40, "characters": 25, "story_arc": 25, "chapters": 10}
_VALIDATOR_BLUEPRINT = {"title": "测试故事", "genre": "科幻", "setting": "未来世界", "core_conflict": "人与AI的冲突",
                        "themes": ["科技", "伦理"], "tone": "紧张", "target_audience": "成人"}
_VALIDATOR_CAST = {"characters": [
    {"id": "protagonist", "name": "主角", "archetype": "英雄"}, {"id": "ally", "name": "盟友", "archetype": "助手"},
    {"id": "rival", "name": "对手", "archetype": "反派"}, {"id": "mentor", "name": "导师", "archetype": "智者"},
    {"id": "wildcard", "name": "变数", "archetype": "神秘人"}]}
_VALIDATOR_CONTEXT = {
    "blueprint": {},
    "characters": {"blueprint": _VALIDATOR_BLUEPRINT},
    "story_arc": {"blueprint": _VALIDATOR_BLUEPRINT, "characters": _VALIDATOR_CAST},
    "chapters": {"blueprint": {"title": "测试故事"}, "characters": {"characters": []},
                 "story_arc": {"title": "测试故事", "chapters": [{"id": i} for i in range(1, 13)]}, "chapter_ids": [1]},
}


def validator_fields(task_type: str, user_input: str) -> dict[str, Any]:
    """Request fields exactly as the validators send them (a fresh copy: callers may change it)."""
    return copy.deepcopy({"task_type": task_type, "user_input": user_input, **_VALIDATOR_CONTEXT[task_type]})
