"""Hostile input, fuzzed with hypothesis: at StoryService.answer (every type, nesting, size and code point in
every field) and through a real Axon and Dendrite. No exception escapes, every answer is an output_data object,
and an answer that is not a story is a clear error, never an internal one."""
from __future__ import annotations

import copy
import json
from typing import Any

import bittensor as bt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import Backend, BackendError, Generation, Health, ModelInfo, Request
from backends.chain import BackendState, Chain
from miner import examples
from miner.config import Config, GenerationSettings
from miner.contract import MINER_FIELDS
from miner.demo import make_wallet, start_offline_miner
from miner.forwarded import forward
from miner.neuron import no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from miner.service import MAX_CONTEXT_DEPTH, StoryService
from miner.tasks import TASKS

NO_ANSWERS = "prompt checked: this backend writes no answers"


class PromptReader(Backend):
    """Reads the prompt and schema the way a tokenizer and an API client do (UTF-8, JSON), then declines:
    the fuzz is about what reaches a backend, and a real model would spend seconds per case."""
    type, mode = "prompt_reader", "local"
    Settings = None  # type: ignore[assignment]

    def __init__(self):
        super().__init__("reader")
        self.read = 0

    @classmethod
    def from_settings(cls, settings: Any) -> Backend:
        return cls()  # it has no settings: the tests build it directly

    def generate(self, request: Request) -> Generation:
        json.dumps(request.messages, ensure_ascii=False).encode("utf-8")
        json.dumps(request.schema, ensure_ascii=False).encode("utf-8")
        self.read += 1
        raise BackendError(NO_ANSWERS)

    def health(self) -> Health:
        return Health(True, "reads prompts")

    def info(self) -> ModelInfo:
        return ModelInfo("local", "reader", "tests")


# ---- strategies ----------------------------------------------------------------------------------------

HOSTILE_CHARS = st.one_of(st.characters(), st.characters(categories=["Cs"]),  # lone surrogates
                          st.sampled_from("\x00\x01\x1b\x7f\x85\u2028\ufeff\ufffe"))
TEXT = st.one_of(st.text(HOSTILE_CHARS, max_size=40), st.sampled_from(examples.VALIDATOR_PROMPTS),
                 st.builds(lambda piece, n: piece * n, st.text(HOSTILE_CHARS, min_size=1, max_size=8),
                           st.integers(min_value=200, max_value=2500)))  # around the input limits
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                     st.dictionaries(TEXT, inner, max_size=6)), max_leaves=30)
NOT_JSON = st.one_of(st.binary(max_size=8), st.sets(st.integers(), max_size=3), st.tuples(st.integers()),
                     st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2), st.just(object()))


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"title": "深"}
    for _ in range(depth):
        value = {"title": "深", "inner": [value]}
    return value


@st.composite
def mutated_context(draw, name: str) -> dict[str, Any]:
    """The validators' own mock context with a field (of a cast member, for a cast) replaced, added or dropped."""
    value = copy.deepcopy(examples.validator_fields("story_arc" if name == "characters" else "chapters", "x")[name])
    target = draw(st.sampled_from(value)) if isinstance(value, list) else value
    keys = sorted(target)
    action = draw(st.sampled_from(["replace", "add", "drop", "as_is"]))
    if action == "replace":
        target[draw(st.sampled_from(keys))] = draw(JSON)
    elif action == "add":
        target[draw(TEXT)] = draw(JSON)
    elif action == "drop":
        del target[draw(st.sampled_from(keys))]
    return value


def context(name: str, wire: bool) -> st.SearchStrategy:
    options = [st.none(), mutated_context(name), JSON, st.dictionaries(TEXT, JSON, max_size=4),
               st.integers(min_value=MAX_CONTEXT_DEPTH - 2, max_value=3 * MAX_CONTEXT_DEPTH).map(nested)]
    return st.one_of(*options, *([] if wire else [NOT_JSON]))


def fields(wire: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A request's fields: over the wire only JSON travels; in-process, anything at all. Half are a
    validator's request with one field made hostile, so that many get past the checks to a backend."""
    anything = JSON if wire else st.one_of(JSON, NOT_JSON)
    random = random_fields(wire, anything)
    one_bad = st.builds(lambda task, prompt, bad: {**examples.validator_fields(task, prompt), **bad},
                        st.sampled_from(list(TASKS)), st.sampled_from(examples.VALIDATOR_PROMPTS),
                        random.flatmap(lambda f: st.sampled_from(sorted(f)).map(lambda k: {k: f[k]})))
    return st.one_of(random, one_bad)


def random_fields(wire: bool, anything: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "task_type": st.one_of(st.sampled_from([*TASKS, "", "poem", "Blueprint", "chapters\x00"]), anything),
        "user_input": st.one_of(TEXT, anything),
        "blueprint": context("blueprint", wire),
        "characters": context("characters", wire),
        "story_arc": context("story_arc", wire),
        "chapter_ids": st.one_of(st.none(), st.lists(st.integers(min_value=-5, max_value=2**64), max_size=5),
                                 st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3), anything),
    })


def assert_clear(output: Any) -> None:
    assert isinstance(output, dict) and list(output) == ["error", "error_kind", *MINER_FIELDS], output
    assert not forward(output, output["task_type"]).problems  # a 3.2.1 validator's rebuild takes it whole
    assert output["error_kind"] in ("input", "failed", "busy"), output  # never "internal": that is a bug
    error = output["error"]
    assert isinstance(error, str) and error.strip()
    error.encode("utf-8")  # travels back as JSON: no lone surrogate may leak into it
    assert "internal error" not in error, error  # a bug, not a refusal


# ---- at the service ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader_service() -> tuple[StoryService, PromptReader]:
    reader = PromptReader()
    return StoryService(Chain([BackendState(reader, "reader")]), GenerationSettings()), reader


def fuzz_service(service: StoryService, reader: PromptReader, cases: int) -> None:
    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(fields(wire=False))
    def one(request: dict[str, Any]) -> None:
        answer = service.answer(request)
        assert_clear(answer.output)
        json.dumps(answer.output)

    before = reader.read
    one()
    assert reader.read > before  # some cases got through every check, to the prompt a backend reads


@pytest.mark.slow
def test_fuzzed_requests_get_an_answer_object_and_never_an_exception(reader_service):
    fuzz_service(*reader_service, cases=500)  # -m long runs ten thousand


@pytest.mark.slow
@pytest.mark.long
def test_ten_thousand_fuzzed_requests(reader_service):
    fuzz_service(*reader_service, cases=10_000)


HOSTILE_TEXT = [
    ("user_input", "一个关于\x00太空\ud800探险的故事\x1b[31m"),
    ("blueprint", {"title": "测试\x00故事", "genre": "科\udfff幻", "setting": "未来\x07世界", "core_conflict": "人与AI"}),
]


@pytest.mark.parametrize("field,value", HOSTILE_TEXT, ids=[f for f, _ in HOSTILE_TEXT])
def test_control_characters_and_lone_surrogates_are_cleaned_before_the_prompt(reader_service, field, value):
    service, _ = reader_service
    request = {**examples.validator_fields("characters", examples.VALIDATOR_PROMPTS[1]), field: value}
    spec, ctx = service.prepare(request)
    prompt = json.dumps(spec.messages(ctx), ensure_ascii=False)
    prompt.encode("utf-8")
    assert "\\u0000" not in prompt and "\\u001b" not in prompt and "\\u0007" not in prompt
    assert ("太空\ufffd探险" if field == "user_input" else "测试故事") in prompt


def test_a_context_nested_past_the_cap_is_refused_by_name(reader_service):
    service, _ = reader_service
    request = {**examples.validator_fields("characters", "x"), "blueprint": nested(MAX_CONTEXT_DEPTH)}
    answer = service.answer(request)
    assert "blueprint nests more than 12 levels deep" in answer.output["error"]
    deep = {**request, "blueprint": nested(5000)}  # deeper than json.dumps could ever recurse
    assert "blueprint nests more than" in service.answer(deep).output["error"]
    shallow = {**request, "blueprint": nested(3)}
    assert service.answer(shallow).output["error"].endswith(NO_ANSWERS)  # accepted, on to the backend


# ---- through a real Axon ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def axon(tmp_path_factory):
    wallets = str(tmp_path_factory.mktemp("wallets"))
    validator = make_wallet(wallets, "validator")
    service = StoryService(Chain([BackendState(PromptReader(), "reader")]), Config().generation)
    with no_public_ip_lookup():
        miner = start_offline_miner(Config(), service, wallets, [validator.hotkey.ss58_address])
        try:
            yield miner, bt.Dendrite(wallet=validator)
        finally:
            miner.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the client's own malformed output_data
def test_fuzzed_synapses_through_a_real_axon_get_an_answer_object(axon):
    miner, dendrite = axon

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(fields(wire=True), st.one_of(st.none(), JSON))
    def one(request: dict[str, Any], stray: Any) -> None:
        # model_construct skips the client-side checks, as a misbehaving validator's code would
        synapse = StoryGenerationSynapse.model_construct(**request, output_data=stray)
        response = dendrite.query(axons=[miner.axon.info()], synapse=synapse, timeout=20, deserialize=False)[0]
        assert response.is_success, (response.axon.status_code, response.axon.status_message)
        assert_clear(response.output_data)

    one()
