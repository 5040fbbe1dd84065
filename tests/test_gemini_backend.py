"""The Gemini backend through google-genai, against a loopback server speaking Gemini's REST wire format
(POST /{version}/models/{model}:generateContent, GET /{version}/models/{model}): Gemini's own servers cannot
run here, so this is the one fake, and it checks what the real SDK sends."""
from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from backends.base import BackendError, Request
from backends.chain import Chain
from backends.gemini_api import GeminiBackend, GeminiSettings, gemini_schema
from miner import examples
from miner.config import ChainSettings, GenerationSettings
from miner.service import StoryService
from miner.tasks import TASKS, Context
from tests.fakes import BLUEPRINT
from tests.scripted_http import ScriptedHTTP

KEY_ENV = "STORYNET_TEST_GEMINI_KEY"
MODEL = "gemini-2.0-flash"
def gemini_answer(text: str, finish: str = "STOP") -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish,
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 31, "candidatesTokenCount": 77, "totalTokenCount": 108},
            "modelVersion": "gemini-2.0-flash-001"}


def error(code: int, status: str, message: str) -> tuple[int, dict]:
    return code, {"error": {"code": code, "message": message, "status": status}}


@pytest.fixture
def fake():
    server = ScriptedHTTP(when_empty=error(404, "NOT_FOUND", "nothing queued"))  # Gemini's wire format
    yield server
    server.close()


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, "test-gemini-key")
    return "test-gemini-key"


def settings(url: str, **kw) -> GeminiSettings:
    return GeminiSettings(**{"type": "gemini", "model": MODEL, "api_key_env": KEY_ENV, "base_url": url,
                             "timeout_s": 5, **kw})


def request(schema=None, seconds: float = 20) -> Request:
    return Request(messages=[{"role": "system", "content": "You write stories."},
                             {"role": "user", "content": "A story about a lighthouse."}],
                   max_tokens=300, deadline=time.monotonic() + seconds, schema=schema, temperature=0.7, top_p=0.9)


def test_the_sdk_asks_for_json_shaped_by_the_schema_and_the_answer_comes_back(fake, key):
    fake.replies.append((200, gemini_answer(json.dumps(BLUEPRINT))))
    schema = TASKS["blueprint"].schema(Context(user_input="x"))
    generation = GeminiBackend.from_settings(settings(fake.url)).generate(request(schema))
    sent = fake.requests[-1]
    assert sent["method"] == "POST" and re.fullmatch(rf"/v1(beta)?/models/{MODEL}:generateContent", sent["path"])
    assert sent["headers"]["x-goog-api-key"] == key
    body = sent["body"]
    assert body["systemInstruction"]["parts"][0]["text"] == "You write stories."
    assert [c["role"] for c in body["contents"]] == ["user"]
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == gemini_schema(schema)
    assert (config["temperature"], config["topP"], config["maxOutputTokens"]) == (0.7, 0.9, 300)
    assert json.loads(generation.text) == BLUEPRINT
    assert (generation.prompt_tokens, generation.completion_tokens) == (31, 77)
    assert (generation.model.mode, generation.model.provider, generation.model.name, generation.model.version) == (
        "api", "gemini", MODEL, "gemini-2.0-flash-001")


def test_the_schema_keeps_only_what_gemini_takes():
    ctx = Context(user_input="x", blueprint=examples.BLUEPRINT, characters=examples.CHARACTERS,
                  story_arc=examples.STORY_ARC, chapter_ids=[1])
    converted = json.dumps([gemini_schema(TASKS[name].schema(ctx)) for name in TASKS])
    for dropped in ('"minLength"', '"maxLength"', '"const"', '"items": false'):
        assert dropped not in converted
    characters = gemini_schema(TASKS["characters"].schema(ctx))["properties"]["characters"]
    assert characters["prefixItems"][0]["properties"]["id"] == {"enum": ["protagonist"]}
    assert characters["minItems"] == characters["maxItems"] == 5


def test_server_errors_are_retried_while_time_allows_then_reported(fake, key):
    fake.replies.extend([error(503, "UNAVAILABLE", "overloaded")] * 2)
    with pytest.raises(BackendError, match="overloaded.*2 tries"):
        GeminiBackend.from_settings(settings(fake.url, max_retries=1)).generate(request())
    assert len(fake.requests) == 2


def test_a_refused_key_is_not_retried_and_says_which_variable(fake, key):
    fake.replies.append(error(403, "PERMISSION_DENIED", "API key not valid"))
    with pytest.raises(BackendError, match=f"key in {KEY_ENV}.*API key not valid"):
        GeminiBackend.from_settings(settings(fake.url)).generate(request())
    assert len(fake.requests) == 1


def test_a_blocked_answer_is_a_failure_not_text(fake, key):
    fake.replies.append((200, gemini_answer("", finish="SAFETY")))
    with pytest.raises(BackendError, match="SAFETY"):
        GeminiBackend.from_settings(settings(fake.url)).generate(request())


@pytest.mark.slow
def test_a_stalled_server_is_cut_off_at_the_request_deadline(fake, key):
    fake.replies.extend([("stall", 6)] * 3)
    backend = GeminiBackend.from_settings(settings(fake.url, timeout_s=30, max_retries=0))
    # timeout_s is 30 and the stall ends (with a dropped connection) after 6 s: only the 2.5 s deadline
    # can make this a timeout.
    with pytest.raises(BackendError, match="did not answer.*Timeout"):
        backend.generate(request(seconds=2.5))


def test_health_looks_the_model_up(fake, key):
    fake.replies.append((200, {"name": f"models/{MODEL}", "displayName": "Gemini 2.0 Flash"}))
    backend = GeminiBackend.from_settings(settings(fake.url))
    assert backend.health().ok and re.fullmatch(rf"/v1(beta)?/models/{MODEL}", fake.requests[-1]["path"])
    fake.replies.append(error(404, "NOT_FOUND", f"models/{MODEL} is not found"))
    health = backend.health()
    assert not health.ok and f"no model {MODEL}" in health.detail


def test_without_a_key_the_backend_is_down_and_the_next_one_serves(fake, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(BackendError, match=KEY_ENV):
        GeminiBackend.from_settings(settings(fake.url))
    monkeypatch.setenv("STORYNET_TEST_GEMINI_KEY_2", "second-key")
    fake.replies.append((200, gemini_answer(json.dumps(BLUEPRINT))))
    chain = Chain.from_config([settings(fake.url, name="first"),
                               settings(fake.url, name="second", api_key_env="STORYNET_TEST_GEMINI_KEY_2")],
                              ChainSettings())
    answer = StoryService(chain, GenerationSettings()).answer(examples.example_fields("blueprint"))
    assert answer.ok, answer.output
    assert answer.output["model_info"]["mode"] == "api" and answer.output["model_info"]["provider"] == "gemini"
    assert fake.requests[-1]["headers"]["x-goog-api-key"] == "second-key"
