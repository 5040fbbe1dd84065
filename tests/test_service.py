"""StoryService.prepare on every kind of bad input, with no Axon and no model: it has no side effects, so
these run in milliseconds. A few of the same go through a real Axon in test_axon.py."""
from __future__ import annotations

import pytest

from backends.chain import BackendState, Chain
from miner import examples
from miner.config import GenerationSettings
from miner.service import StoryService
from miner.tasks import TaskInputError

NEVER_ASKED = "the chain must not be asked for bad input"


@pytest.fixture
def service() -> StoryService:
    return StoryService(Chain([BackendState(None, "none", build_error=NEVER_ASKED)]), GenerationSettings())


CHAPTERS = examples.example_fields("chapters")
BAD_REQUESTS = [
    ({"user_input": "a story"}, "task_type must be one of"),
    ({"task_type": "", "user_input": "a story"}, "task_type must be one of"),
    ({"task_type": "poem", "user_input": "a story"}, "got 'poem'"),
    ({"task_type": ["blueprint"], "user_input": "a story"}, "task_type must be one of"),
    ({"task_type": "blueprint"}, "user_input is empty"),
    ({"task_type": "blueprint", "user_input": ""}, "user_input is empty"),
    ({"task_type": "blueprint", "user_input": " \n\t "}, "user_input is empty"),
    ({"task_type": "blueprint", "user_input": 42}, "user_input must be a string, got int"),
    ({"task_type": "blueprint", "user_input": "x" * 2001}, "generation.max_input_chars"),
    ({"task_type": "characters", "user_input": "x"}, "needs blueprint"),
    ({"task_type": "story_arc", "user_input": "x", "blueprint": examples.BLUEPRINT}, "needs characters"),
    ({"task_type": "characters", "user_input": "x", "blueprint": ["not", "an", "object"]},
     "blueprint must be a JSON object, got list"),
    ({"task_type": "characters", "user_input": "x", "blueprint": {"filler": "y" * 40_000}}, "max_context_chars"),
    ({**CHAPTERS, "chapter_ids": None}, "needs chapter_ids"),
    ({**CHAPTERS, "chapter_ids": []}, "non-empty list"),
    ({**CHAPTERS, "chapter_ids": "1,2"}, "non-empty list"),
    ({**CHAPTERS, "chapter_ids": [-3]}, "from 1 to 100"),
    ({**CHAPTERS, "chapter_ids": [0]}, "from 1 to 100"),
    ({**CHAPTERS, "chapter_ids": [2**62]}, "from 1 to 100"),
    ({**CHAPTERS, "chapter_ids": [1.5]}, "from 1 to 100"),
    ({**CHAPTERS, "chapter_ids": [True]}, "from 1 to 100"),
    ({**CHAPTERS, "chapter_ids": list(range(1, 3001))}, "generation.max_chapters"),
    ({**CHAPTERS, "chapter_ids": [2, 2]}, "must not repeat"),
]


@pytest.mark.parametrize("fields,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_input_is_refused_naming_the_field_and_the_fix(service, fields, message):
    with pytest.raises(TaskInputError, match=message.replace("(", r"\(")):
        service.prepare(fields)


@pytest.mark.parametrize("fields,message", BAD_REQUESTS[:4], ids=[m for _, m in BAD_REQUESTS[:4]])
def test_bad_input_gets_an_error_answer_without_asking_a_backend(service, fields, message):
    answer = service.answer(fields)
    assert not answer.ok and message in answer.output["error"] and NEVER_ASKED not in answer.output["error"]
    assert answer.model_info is None  # nothing was generated: no model is claimed


@pytest.mark.parametrize("task", ["blueprint", "characters", "story_arc", "chapters"])
def test_the_validators_requests_are_accepted(service, task):
    for prompt in examples.VALIDATOR_PROMPTS:
        spec, ctx = service.prepare(examples.validator_fields(task, prompt))
        assert spec.name == task and ctx.user_input == prompt
