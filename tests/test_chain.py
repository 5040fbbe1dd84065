"""The fallback chain. Order and cool-down use an in-memory backend with enqueue()/history; the ways a
real API fails (stalls, HTTP 500, JSON that breaks the contract) use the real OpenAI backend against a
loopback HTTP server that misbehaves, with a real custom command as the backend that then answers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import backends
from backends.base import AnswerRejected, Backend, BackendBusy, BackendError, Generation, Health, Request
from backends.chain import AllBackendsFailed, BackendState, Chain
from backends.custom_command import CustomSettings
from backends.openai_api import OpenAIBackend, OpenAISettings
from backends.sizing import shrink
from miner import examples
from miner.config import ChainSettings, GenerationSettings
from miner.service import StoryService
from tests.fakes import BLUEPRINT, FakeBackend, chain_of
from tests.scripted_http import ScriptedHTTP

def request(seconds: float = 20.0) -> Request:
    return Request(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, deadline=time.monotonic() + seconds)


def text(generation: Generation) -> str:
    return generation.text


def test_a_backend_that_keeps_failing_is_skipped_then_probed_again():
    primary = FakeBackend("primary").enqueue(BackendError("out of VRAM"), BackendError("out of VRAM"))
    fallback = FakeBackend("fallback").enqueue("b1", "b2", "b3")
    chain = chain_of(primary, fallback, cooldown_s=0.3)
    assert [chain.generate(request(), text)[0] for _ in range(3)] == ["b1", "b2", "b3"]
    assert len(primary.history) == 2  # the third request went straight to the fallback
    assert chain.states[0].last_error == "out of VRAM"
    time.sleep(0.4)  # the cool-down ends
    primary.enqueue("back")
    result, generation = chain.generate(request(), text)
    assert (result, generation.backend, chain.states[0].consecutive_failures) == ("back", "primary", 0)


def test_a_backend_on_cool_down_still_answers_when_nothing_else_can():
    primary = FakeBackend("primary").enqueue(BackendError("x"), BackendError("x"), "from the cooling one")
    fallback = FakeBackend("fallback").enqueue("f1", "f2", BackendError("down too"))
    chain = chain_of(primary, fallback)
    chain.generate(request(), text)
    chain.generate(request(), text)
    assert chain.generate(request(), text)[0] == "from the cooling one"


def test_an_answer_the_caller_rejects_moves_on_and_a_crash_does_not_stop_the_chain():
    def accept(g: Generation) -> dict:
        return json.loads(g.text)  # ValueError on non-JSON, like the task contract check
    first = FakeBackend("first").enqueue("not json")
    second = FakeBackend("second").enqueue(RuntimeError("bug in a backend"))
    third = FakeBackend("third").enqueue('{"ok": true}')
    result, generation = chain_of(first, second, third).generate(request(), accept)
    assert result == {"ok": True} and generation.backend == "third"


def test_a_busy_backend_is_passed_over_without_a_cool_down_and_counted_apart_from_failures():
    busy = BackendBusy("busy: with 4 answers decoding, even the smallest answer needs more than the 55 s left")
    primary = FakeBackend("primary").enqueue(busy, busy, "from the primary")
    fallback = FakeBackend("fallback").enqueue("f1", "f2")
    chain = chain_of(primary, fallback)  # two failures in a row would mean a cool-down
    assert [chain.generate(request(), text)[0] for _ in range(2)] == ["f1", "f2"]
    state = chain.states[0]
    assert (state.busy, state.consecutive_failures, state.last_error) == (2, 0, None)
    assert not state.cooling(time.monotonic()) and chain.serving() is state
    assert chain.generate(request(), text)[0] == "from the primary"  # asked first again
    assert [(s.served, s.busy) for s in chain.snapshot()] == [(1, 2), (2, 0)]


def test_a_retry_refused_as_busy_is_counted_busy_and_the_rejection_moves_on():
    def accept(g: Generation) -> str:
        if g.text == "too thin":
            raise AnswerRejected("setting is missing")
        return g.text
    primary = FakeBackend("primary").enqueue("too thin", BackendBusy("busy: no time for another try"))
    fallback = FakeBackend("fallback").enqueue("from the fallback")
    chain = chain_of(primary, fallback)
    assert chain.generate(request(), accept)[0] == "from the fallback"
    assert len(primary.history) == 2  # the answer, then the retry the backend refused
    state = chain.states[0]
    assert (state.busy, state.consecutive_failures, state.last_error) == (1, 1, "setting is missing")


class CallerLeaves(FakeBackend):
    """The caller goes away while this backend works on its answer (the Axon sets the event)."""

    def generate(self, request: Request) -> Generation:
        request.cancelled.set()
        return super().generate(request)


def test_once_the_caller_has_gone_away_no_further_backend_is_tried():
    first = CallerLeaves("first").enqueue(BackendError("the request was cancelled: its caller has gone away"))
    second = FakeBackend("second").enqueue("an answer nobody waits for")
    chain = chain_of(first, second)
    with pytest.raises(AllBackendsFailed) as e:
        chain.generate(request(), text)
    assert e.value.reasons == [("first", "the request was cancelled: its caller has gone away"),
                               ("second", "skipped: the caller has gone away")]
    assert second.history == []
    assert chain.states[0].consecutive_failures == 0  # a caller leaving says nothing about the backend


def test_when_every_backend_fails_the_error_says_why_for_each():
    broken = BackendState(None, "local", build_error="model file /m.gguf does not exist")
    api = FakeBackend("api").enqueue(BackendError("HTTP 500"))
    chain = Chain([broken, BackendState(api, "api")])
    with pytest.raises(AllBackendsFailed) as e:
        chain.generate(request(), text)
    assert e.value.reasons == [("local", "model file /m.gguf does not exist"), ("api", "HTTP 500")]


def test_health_checks_steer_the_chain():
    primary, fallback = FakeBackend("primary"), FakeBackend("fallback").enqueue("f")
    chain = chain_of(primary, fallback)
    primary.healthy = Health(False, "GPU lost")
    assert [h.ok for h in chain.probe()] == [False, True]
    assert chain.serving().label == "fallback"
    assert chain.generate(request(), text)[0] == "f" and primary.history == []
    primary.healthy = Health(True, "fine again")
    chain.probe()
    assert chain.serving().label == "primary"


# --- real failures of a real API --------------------------------------------------------------------------
def completion(content: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-test",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}


@pytest.fixture
def api():
    server = ScriptedHTTP()  # an OpenAI-compatible endpoint that misbehaves on cue
    yield server
    server.close()


def service(*backends) -> StoryService:
    return StoryService(Chain.from_config(backends, ChainSettings()), GenerationSettings())


def cloud(api: ScriptedHTTP, **kw) -> OpenAISettings:
    return OpenAISettings(**{"type": "openai", "name": "cloud", "model": "gpt-test", "base_url": f"{api.url}/v1",
                             "api_key_env": None, **kw})


@pytest.mark.slow
def test_a_stalled_api_gives_way_to_the_next_backend(api, writer):
    api.replies.append(("stall", 8))
    svc = service(cloud(api, timeout_s=2, max_retries=0), writer)
    answer = svc.answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["model_info"]["mode"] == "custom"
    assert answer.output["title"] == examples.BLUEPRINT["title"]  # the writer's
    assert "did not answer" in svc.chain.states[0].last_error and "Timeout" in svc.chain.states[0].last_error


@pytest.mark.slow
def test_an_api_stalled_past_the_deadline_leaves_a_clear_error_not_a_placeholder(api, writer):
    api.replies.append(("stall", 8))
    svc = service(cloud(api, timeout_s=20, max_retries=0), writer)
    answer = svc.answer(examples.example_fields("blueprint"), timeout_s=8)  # 3 s after the response margin
    assert answer.output["error_kind"] == "failed" and answer.model_info is None
    assert "cloud:" in answer.output["error"] and "writer: skipped: the deadline had passed" in answer.output["error"]


def test_an_api_answering_500_is_retried_within_bounds_then_passed_over(api, writer):
    api.replies.extend([(500, {"error": {"message": "upstream exploded"}})] * 3)
    svc = service(cloud(api, max_retries=1), writer)
    answer = svc.answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["model_info"]["name"] == "fixture-writer"
    assert len(api.requests) == 2  # one try and one retry, no more
    assert "upstream exploded" in svc.chain.states[0].last_error


def test_json_that_breaks_the_contract_is_tried_once_more_then_moves_on(api, writer):
    api.replies.extend([(200, completion(json.dumps({"title": "Too thin", "genre": "x"})))] * 2)
    svc = service(cloud(api), writer)
    answer = svc.answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["model_info"]["mode"] == "custom"
    assert len(api.requests) == 2
    assert "setting" in svc.chain.states[0].last_error  # the contract check named what was missing


def test_an_api_answer_with_raw_control_characters_in_its_strings_is_read(api, writer):
    text = json.dumps(BLUEPRINT).replace(BLUEPRINT["setting"][:20], BLUEPRINT["setting"][:20] + "\n\t", 1)
    assert "\n\t" in text  # a raw newline and tab inside a JSON string: strict json.loads refuses them
    api.replies.append((200, completion(text)))
    answer = service(cloud(api), writer).answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["model_info"]["mode"] == "api"
    assert "\n\t" in answer.output["setting"]


def test_an_api_answer_that_is_not_json_is_retried_on_the_same_backend_first(api, writer):
    api.replies.extend([(200, completion('{"title": "Half an answer", "genre": ')),
                        (200, completion(json.dumps(BLUEPRINT)))])
    svc = service(cloud(api), writer)
    answer = svc.answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["model_info"]["mode"] == "api"
    assert len(api.requests) == 2 and svc.chain.states[1].served == 0


def test_a_rejected_answer_is_retried_once_on_the_same_backend():
    broken = json.dumps({**BLUEPRINT, "setting": "too short"})
    primary = FakeBackend("primary").enqueue(broken, json.dumps(BLUEPRINT))
    svc = StoryService(chain_of(primary), GenerationSettings())
    answer = svc.answer(examples.example_fields("blueprint"))
    assert answer.ok and answer.output["title"] == BLUEPRINT["title"]
    assert len(primary.history) == 2 and primary.history[1].prefix == ""  # no part worth keeping: all again


def test_a_retry_keeps_what_was_right_where_the_backend_sized_the_answer():
    chapter = {"id": 1, "title": "The Signal", "content": "The relay spoke at midnight. " * 40,
               "choices": [{"id": "A", "text": "Answer it", "consequences": {"outcome": "The station wakes up."}},
                           {"id": "B", "text": "Stay silent", "consequences": {"outcome": "The station wakes up."}}]}
    fixed = {**chapter, "choices": [chapter["choices"][0], {**chapter["choices"][1],
                                                            "consequences": {"outcome": "The convoy drifts on."}}]}
    svc = StoryService(chain_of(FakeBackend("unused")), GenerationSettings())
    spec, ctx = svc.prepare(examples.example_fields("chapters"))
    sized = shrink(spec.schema(ctx), 0.5)  # what the backend says it held the answer to
    primary = SizedFake("primary", sized).enqueue(json.dumps({"chapters": [chapter]}),
                                                  json.dumps({"chapters": [fixed]}))
    svc = StoryService(chain_of(primary), GenerationSettings())
    answer = svc.answer(examples.example_fields("chapters"))
    assert answer.ok
    assert answer.output["chapters"][0]["choices"][1]["consequences"]["outcome"] == "The convoy drifts on."
    retry = primary.history[1]
    assert retry.prefix.endswith('"text":"Stay silent","consequences":')
    assert retry.prefix.startswith('{"chapters":[{"id":1,"title":"The Signal","content":"The relay')
    assert retry.schema is sized and retry.resize is None
    assert retry.messages == spec.messages(ctx, "auto", sized) != primary.history[0].messages  # sized lengths


class SizedFake(FakeBackend):
    def __init__(self, name: str, schema: dict):
        super().__init__(name)
        self.schema = schema

    def generate(self, request: Request) -> Generation:
        generation = super().generate(request)
        return Generation(**{**generation.__dict__, "schema": self.schema})


def test_a_good_api_answer_is_reported_as_api(api, writer):
    api.replies.append((200, completion(json.dumps(BLUEPRINT))))
    answer = service(cloud(api), writer).answer(examples.example_fields("blueprint"))
    info = answer.output["model_info"]
    assert (info["mode"], info["name"], info["version"]) == ("api", "gpt-test", None)


def test_health_names_the_variable_whose_key_was_refused(api, monkeypatch):
    monkeypatch.setenv("STORYNET_TEST_OPENAI_KEY", "sk-wrong")
    api.replies.append((401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}))
    backend = OpenAIBackend.from_settings(cloud(api, api_key_env="STORYNET_TEST_OPENAI_KEY"))
    health = backend.health()
    assert not health.ok and "refused the API key in STORYNET_TEST_OPENAI_KEY" in health.detail
    assert "sk-wrong" not in health.detail


def test_a_backend_that_could_not_be_built_heals_on_the_next_health_check(tmp_path, writer):
    late = tmp_path / "late.py"
    settings = CustomSettings(type="custom", name="late", command=[str(late)])
    chain = Chain.from_config([settings, writer], ChainSettings())
    assert chain.states[0].backend is None and "late.py" in chain.states[0].build_error
    late.write_text(Path(writer.command[0]).read_text())
    late.chmod(0o755)
    assert [h.ok for h in chain.probe(rebuild=True)] == [True, True]
    assert chain.serving().label == "late"


class Explodes(Backend):
    """A backend with a bug in its constructor."""

    @classmethod
    def from_settings(cls, settings):
        raise ZeroDivisionError("a bug")


def test_a_backend_whose_construction_has_a_bug_is_down_and_the_others_serve(monkeypatch, writer):
    monkeypatch.setitem(backends.REGISTRY, "openai", f"{__name__}:Explodes")
    chain = Chain.from_config([OpenAISettings(type="openai", name="buggy", model="m"), writer], ChainSettings())
    assert chain.states[0].backend is None
    assert chain.states[0].build_error == "unexpected ZeroDivisionError: a bug"
    assert chain.serving().label == chain.states[1].label
