"""StoryService.prepare on every kind of bad input, with no Axon and no model: it has no side effects, so
these run in milliseconds. A few of the same go through a real Axon in test_axon.py. The caller's timeout
and cancellation, with an in-memory backend that records what it was asked."""
from __future__ import annotations

import json
import math
import re
import threading
import time

import pytest

from backends.base import BackendBusy, BackendError
from backends.chain import BackendState, Chain
from miner import examples
from miner.config import GenerationSettings
from miner.contract import error_of
from miner.service import MAX_TIMEOUT_S, StoryService
from miner.tasks import TaskInputError
from tests.fakes import FakeBackend, chain_of

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


@pytest.mark.parametrize("task", ["story_arc", "chapters"])
def test_both_protocols_cast_shapes_reach_the_task_as_the_same_cast(service, task):
    fields = examples.validator_fields(task, "x")  # 3.2.1: a bare list
    wrapped = {**fields, "characters": examples.cast_as("3.2.0", fields["characters"]), "protocol_version": "3.2.0"}
    assert isinstance(fields["characters"], list) and isinstance(wrapped["characters"], dict)
    assert service.prepare(fields) == service.prepare(wrapped)


def test_a_chapters_request_with_an_empty_cast_is_valid_and_asks_for_named_characters(service):
    spec, ctx = service.prepare(examples.validator_fields("chapters", "一个末日生存的故事"))
    assert ctx.characters == [] and ctx.blueprint == {"title": "Sample Story"}
    prompt = spec.messages(ctx)[1]["content"]
    assert "no cast is given: create the named characters" in prompt
    assert "chapter 1: the opening of the story" in prompt  # the mock arc lists bare ids: no empty line
    system, user = (m["content"] for m in spec.messages(ctx))
    assert "Simplified Chinese" in system and user.endswith("Write every text value in Simplified Chinese; keep "
                                                           "JSON keys and ids in English.")  # not the context's


def test_names_given_in_the_cast_are_kept(service):
    spec, ctx = service.prepare(examples.validator_fields("story_arc", "一个时间旅行的故事"))
    prompt = spec.messages(ctx)[1]["content"]
    assert "keep these characters and their names exactly as given" in prompt
    assert all(f'"name": "{name}"' in prompt for name in ("Hero", "Ally", "Rival", "Mentor", "Wildcard"))


@pytest.mark.parametrize("cast,message", [
    ("Hero, Ally", "a list of character objects (protocol 3.2.1) or"),
    ([{"id": "protagonist"}, "Ally"], "a list of character objects"),
    ({"cast": []}, "a list of character objects"),
    ([{"bio": "y" * 40_000}], "max_context_chars"),
])
def test_a_malformed_cast_is_refused_naming_both_shapes(service, cast, message):
    with pytest.raises(TaskInputError, match=re.escape(message)):
        service.prepare({**examples.validator_fields("story_arc", "x"), "characters": cast})


def recording_service() -> tuple[StoryService, FakeBackend]:
    backend = FakeBackend("recorder").enqueue(json.dumps(examples.BLUEPRINT))
    return StoryService(chain_of(backend), GenerationSettings()), backend


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 0, 0.0, -5.0, "60"])
def test_a_timeout_that_is_not_a_finite_number_above_0_gets_a_clear_error(timeout):
    service, backend = recording_service()
    answer = service.answer(examples.example_fields("blueprint"), timeout_s=timeout)
    assert answer.output["error_kind"] == "input" and answer.model_info is None
    assert answer.output["error"].startswith("timeout must be a finite number of seconds above 0 (validators send 60; "
                                             f"more than {MAX_TIMEOUT_S:.0f} is read as {MAX_TIMEOUT_S:.0f}), got ")
    assert backend.history == []  # refused before any backend was asked


@pytest.mark.parametrize("timeout", [1e300, 10**400])
def test_a_huge_timeout_is_clamped_and_answered(timeout):
    service, backend = recording_service()
    arrived = time.monotonic()
    answer = service.answer(examples.example_fields("blueprint"), timeout_s=timeout, arrived=arrived)
    assert answer.ok and answer.output["title"] == examples.BLUEPRINT["title"]
    margin = service.settings.response_margin_s
    assert backend.history[0].deadline == pytest.approx(arrived + MAX_TIMEOUT_S - margin)


def test_the_callers_cancel_event_reaches_the_backend():
    service, backend = recording_service()
    cancelled = threading.Event()
    assert service.answer(examples.example_fields("blueprint"), cancelled=cancelled).ok
    assert backend.history[0].cancelled is cancelled


def test_an_error_answer_says_its_kind_and_loadtest_counts_a_does_not_fit_refusal_as_busy():
    """The kind travels in a field of its own: a tool that reads answers never guesses from the words."""
    from miner.loadtest import classify
    from miner.protocol import StoryGenerationSynapse
    full = FakeBackend("local").enqueue(BackendBusy("does not fit: the prompt is 3000 tokens and each request has "
                                                    "2048 tokens of KV cache"))
    broken = FakeBackend("local").enqueue(BackendError("the model file is gone"))
    fields = examples.example_fields("blueprint")
    kinds = {}
    for name, backend in (("full", full), ("broken", broken)):
        output = StoryService(chain_of(backend), GenerationSettings()).answer(fields).output
        assert error_of(output) is not None
        response = StoryGenerationSynapse(**fields, output_data=output)
        response.dendrite.status_code = 200
        kinds[name] = (output["error_kind"], classify("blueprint", fields, response)[0])
    assert kinds == {"full": ("busy", "busy"), "broken": ("failed", "error")}
