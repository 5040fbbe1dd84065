"""The contract checks: they pass what the protocol asks for and name exactly what breaks it."""
import copy
import json

import pytest

from miner import examples
from backends.sizing import LEAST
from miner.tasks import TASKS, Context, ContractError, parse_json_object
from miner.tasks.characters import ROLES
from miner.tasks.common import detect_language, language_instruction

CTX = Context(user_input="一个关于太空探险的故事", blueprint=examples.BLUEPRINT, characters=examples.CHARACTERS,
              story_arc=examples.STORY_ARC, chapter_ids=[1])

GOOD = {
    "blueprint": examples.BLUEPRINT,
    "characters": {"characters": examples.CHARACTERS},
    "story_arc": examples.STORY_ARC,
    "chapters": {"chapters": [{
        "id": 1, "title": "The Signal", "content": "The relay spoke at midnight. " * 40,
        "choices": [{"id": "A", "text": "Answer it", "consequences": {"outcome": "The station wakes."}},
                    {"id": "B", "text": "Stay silent", "consequences": {"outcome": "The convoy drifts on."}}]}]},
}


def broken(task, change):
    answer = copy.deepcopy(GOOD[task])
    change(answer)
    return answer


@pytest.mark.parametrize("task", list(TASKS))
def test_a_contract_answer_passes(task):
    assert TASKS[task].check(copy.deepcopy(GOOD[task]), CTX)


BREAKS = [
    ("blueprint", lambda a: a.update(setting="too short"), "setting has 9 characters, needs 50-300"),
    ("blueprint", lambda a: a.update(themes=["one"]), "themes has 1 items, needs 2-5"),
    ("blueprint", lambda a: a.pop("tone"), "tone must be a non-empty string"),
    ("characters", lambda a: a["characters"].pop(), "exactly 5 objects"),
    ("characters", lambda a: a["characters"][4].update(id="villain"), "character ids must be"),
    ("characters", lambda a: a["characters"][0].update(relationships={"ally": "friend"}), "at least 2 other"),
    ("characters", lambda a: a["characters"][1].update(skills="cooking"), "characters.1.skills must be a list"),
    ("story_arc", lambda a: a["chapters"].pop(), "exactly 12 objects"),
    ("story_arc", lambda a: a["chapters"][5].update(storyProgress=0.1), "chapters.5.storyProgress must rise"),
    ("story_arc", lambda a: a["arcs"]["act2b"].update(chapters=[7, 8]), "arcs.act2b.chapters"),
    ("story_arc", lambda a: a.update(hooks=[]), "hooks must be an object"),
    ("chapters", lambda a: a["chapters"][0].update(content="Too short."), "content has 10 characters"),
    ("chapters", lambda a: a["chapters"][0].update(id=2), "chapters.0.id must be 1"),
    ("chapters", lambda a: a["chapters"][0]["choices"].pop(), "choices must be a list of 2-4"),
    ("chapters", lambda a: a["chapters"][0]["choices"][1].update(consequences={"outcome": "The station wakes."}),
     "different consequences"),
]


@pytest.mark.parametrize("task,change,message", BREAKS, ids=[m for _, _, m in BREAKS])
def test_a_broken_answer_names_the_problem(task, change, message):
    with pytest.raises(ContractError, match=message.replace("(", r"\(")):
        TASKS[task].check(broken(task, change), CTX)


def test_the_blueprint_schema_and_its_check_hold_the_same_bounds():
    """The check's bounds are the schema's: its ceilings, and its floors as far down as the schema may fall
    under load (LEAST: the contract's own minimum, below the lengths the scoring rules reward)."""
    properties = TASKS["blueprint"].schema(CTX)["properties"]
    for key, field in properties.items():
        if field["type"] == "string":
            lo, hi, value = field.get(LEAST, field["minLength"]), field["maxLength"], lambda n: "字" * (n - 1) + "。"
        else:
            lo, hi, value = field["minItems"], field["maxItems"], lambda n: ["主题"] * n
        for n, passes in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
            answer = {**GOOD["blueprint"], key: value(n)}
            if passes:
                assert TASKS["blueprint"].check(answer, CTX) == answer
            else:
                with pytest.raises(ContractError, match=key):
                    TASKS["blueprint"].check(answer, CTX)


def test_repeated_consequences_are_retried_from_the_repeat_only():
    answer = broken("chapters", BREAKS[-1][1])
    with pytest.raises(ContractError) as err:
        TASKS["chapters"].check(answer, CTX)
    keep = err.value.retry_from
    assert keep.endswith('"id":"B","text":"Stay silent","consequences":')
    assert json.dumps(answer, ensure_ascii=False, separators=(",", ":")).startswith(keep)


@pytest.mark.parametrize("answer", [{}, {"chapters": "x"}, {"chapters": [1]}, {"chapters": [{"choices": "x"}]}])
def test_an_answer_of_another_shape_gets_a_whole_retry(answer):
    with pytest.raises(ContractError) as err:
        TASKS["chapters"].check(answer, CTX)
    assert err.value.retry_from is None


def test_a_bare_list_is_not_an_answer():
    with pytest.raises(ContractError, match="expected a JSON object"):
        TASKS["characters"].check(GOOD["characters"]["characters"], CTX)


def test_parse_finds_the_object_inside_a_code_fence():
    assert parse_json_object('Sure!\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    for text, message in [("no json here", "no JSON object"), ('{"a": }', "not valid JSON")]:
        with pytest.raises(ContractError, match=message):
            parse_json_object(text)


def test_schemas_pin_what_json_schema_can():
    characters = TASKS["characters"].schema(CTX)["properties"]["characters"]
    assert [c["properties"]["id"]["const"] for c in characters["prefixItems"]] == list(ROLES)
    arc = TASKS["story_arc"].schema(CTX)["properties"]
    assert [c["properties"]["id"]["const"] for c in arc["chapters"]["prefixItems"]] == list(range(1, 13))
    assert list(arc["arcs"]["properties"]) == ["act1", "act2a", "act2b", "act3"]
    paragraphs = TASKS["chapters"].schema(CTX)["properties"]["chapters"]["prefixItems"][0]["properties"]["paragraphs"]
    fewest, most, one = paragraphs["minItems"], paragraphs["maxItems"], paragraphs["items"]
    joins = 2 * (fewest - 1)  # a blank line between paragraphs in the contract's content
    assert fewest >= 3 and fewest * one[LEAST] + joins >= 1000  # the contract's floor, even shrunk to the least
    assert fewest * one["minLength"] + joins > 1000  # past the rules' threshold when time allows
    assert most * one["maxLength"] + 2 * (most - 1) <= 3000
    blueprint = TASKS["blueprint"].schema(CTX)
    assert blueprint["additionalProperties"] is False and set(blueprint["required"]) == set(GOOD["blueprint"])


def test_messages_carry_the_request_its_context_and_the_language():
    system, user = TASKS["story_arc"].messages(CTX)
    assert "Simplified Chinese" in system["content"]
    assert CTX.user_input in user["content"] and "The Silent Relay" in user["content"]
    assert "Lin Yao" in user["content"]  # characters context included
    assert "English" in TASKS["blueprint"].messages(CTX, language="English")[0]["content"]


@pytest.mark.parametrize("text,language", [("一个AI觉醒的故事", "Simplified Chinese"), ("時間旅行の物語", "Japanese"),
                                           ("История о космосе", "Russian"), ("A heist story", None)])
def test_language_detection(text, language):
    assert detect_language(text) == language
    assert (language or "the language of the story request") in language_instruction(text, "auto")
