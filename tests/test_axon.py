"""A real Axon and a real Dendrite on 127.0.0.1, wallets made in a temp dir, the embedded model in
llama.cpp answering: the path a validator's request takes, end to end."""
from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import bittensor as bt
import pytest

from backends.base import BackendError, Generation, Request
from backends.chain import BackendState, Chain
from miner import examples
from miner.config import Config, GenerationSettings
from miner.demo import make_wallet, start_offline_miner
from miner.neuron import Miner, no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from miner.contract import VALIDATOR_TIMEOUT_S, answer_of, unknown_model_info
from miner.forwarded import forward
from miner.score import facts, prose_fields
from miner.service import StoryService, prepare
from miner.tasks import TASKS, Context
from tests.fakes import BLUEPRINT, CHAPTER, FakeBackend, chain_of
from tests.validator_synapses import VALIDATOR_SYNAPSES

pytestmark = pytest.mark.slow  # a real Axon and the embedded model



@pytest.fixture(scope="module")
def served(embedded_backend, tmp_path_factory):
    """An offline miner allowlisting one validator wallet; yields (miner, validator dendrite, stranger dendrite)."""
    wallets = str(tmp_path_factory.mktemp("wallets"))
    validator, stranger = make_wallet(wallets, "validator"), make_wallet(wallets, "stranger")
    # Answers sized for 10 s: what is checked here (the wire, the contract, prose that ends on sentences and
    # chapters in paragraphs) holds at any size, and speed is bench.py's business.
    config = Config(generation=GenerationSettings(target_s=10))
    service = StoryService(Chain([BackendState(embedded_backend, "local")]), config.generation)
    service.chain.close = lambda: None  # Miner.close() unloads its chain; the session's model outlives this module
    with no_public_ip_lookup():
        miner = start_offline_miner(config, service, wallets, [validator.hotkey.ss58_address])
        try:
            yield miner, bt.Dendrite(wallet=validator), bt.Dendrite(wallet=stranger)
        finally:
            miner.close()


def ask(dendrite, miner, synapse, deserialize=False, timeout=VALIDATOR_TIMEOUT_S):
    return dendrite.query(axons=[miner.axon.info()], synapse=synapse, timeout=timeout, deserialize=deserialize)[0]


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_answers_a_321_validator_as_it_reads_the_answer(served, task):
    """StoryNet 3.2.1: the validators' own mocks (English, the cast a bare list, chapters with no cast) and
    a Chinese prompt, sent through a client typed as 3.2.1 declares the synapse, deserialized as they do."""
    miner, validator, _ = served
    fields = examples.validator_fields(task, examples.VALIDATOR_PROMPTS[list(TASKS).index(task)])
    # Twice their 60 s: on 2 cores the smallest Chinese chapter the 135M model may write is planned at 45-51 s
    # of the 55 s that 60 leave (at the 2.4 tokens a character of the Chinese sample), so a slow moment of
    # the machine would size it out as busy. What arrives is checked here; how fast, by bench and loadtest.
    output = ask(validator, miner, VALIDATOR_SYNAPSES["3.2.1"](**fields), deserialize=True,
                 timeout=2 * VALIDATOR_TIMEOUT_S)
    assert isinstance(output, dict) and "error" not in output, output
    sent = forward(output, task)  # as the validator rebuilds it and sends it for scoring
    assert sent.problems == [] and sent.task_type == task
    TASKS[task].check(answer_of(sent.entry["output_data"]), prepare(fields, GenerationSettings())[1])
    prose = facts(sent.entry["output_data"], task)  # by construction, even from the 135M demo model
    assert prose["sentence_ends"] == 1.0, prose_fields(output, task)  # every judged prose field ends a sentence
    if task == "chapters":
        chapter = output["chapters"][0]["content"]
        assert chapter.count("\n\n") >= 2 and prose["paragraphs"][0] >= 3, chapter
    assert sent.entry["model_info"]["mode"] == "local" and "embedded demo model" in sent.entry["model_info"]["name"]
    assert 0 < sent.entry["generation_time"] < 60


CONTRACT_ANSWERS = {"blueprint": BLUEPRINT, "characters": {"characters": examples.CHARACTERS},
                    "story_arc": examples.STORY_ARC, "chapters": {"chapters": [CHAPTER]}}


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_answers_a_320_validator_and_echoes_its_shapes(miner_from_memory, task):
    """StoryFi 3.2.0 still parses the answer: its cast comes back as the object it sent, model_info an object.
    What is on the wire, not what a model writes (the 3.2.1 test above has the model write every task)."""
    miner, backend, validator = miner_from_memory
    backend.enqueue(json.dumps(CONTRACT_ANSWERS[task]))
    fields = examples.example_fields(task, protocol="3.2.0")
    response = ask(validator, miner, VALIDATOR_SYNAPSES["3.2.0"](**fields))
    assert response.is_success, response.dendrite.status_message
    output = response.output_data
    assert "error" not in output, output
    TASKS[task].check(answer_of(output), prepare(fields, GenerationSettings())[1])
    assert response.characters == fields["characters"] and isinstance(response.characters, dict)
    assert response.model_info == output["model_info"] and response.model_info["mode"] == "custom"
    assert response.generation_time > 0 and response.miner_version


def test_a_chinese_request_as_validators_send_it(served):
    miner, validator, _ = served
    output = ask(validator, miner, StoryGenerationSynapse(task_type="blueprint", user_input="一个末日生存的故事"),
                 deserialize=True)
    TASKS["blueprint"].check(answer_of(output), Context(user_input="x"))


def test_deserialize_returns_output_data(served):
    miner, validator, _ = served
    synapse = StoryGenerationSynapse(task_type="characters", user_input="x")  # no blueprint: a quick error
    output = ask(validator, miner, synapse, deserialize=True)
    assert 0 <= output.pop("generation_time") < 5
    assert output == {"error": "task characters needs blueprint; the request has none", "error_kind": "input",
                      "task_type": "characters", "model_info": unknown_model_info()}


def test_allowlist_rejects_an_unknown_hotkey(served):
    miner, _, stranger = served
    response = ask(stranger, miner, StoryGenerationSynapse(**examples.example_fields("blueprint")))
    assert response.dendrite.status_code == 403
    assert "offline.allowed_hotkeys" in response.dendrite.status_message
    assert response.output_data is None


# A few bad inputs through the real Axon; test_service.py has every kind, without one.
BAD_REQUESTS = [
    ({"task_type": "", "user_input": "a story"}, "task_type must be one of"),
    ({"task_type": "blueprint", "user_input": "x" * 5000}, "generation.max_input_chars"),
    ({**examples.example_fields("chapters"), "chapter_ids": [2, 2]}, "must not repeat"),
]


@pytest.mark.parametrize("fields,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_get_a_clear_error_and_the_miner_keeps_serving(served, fields, message):
    miner, validator, _ = served
    response = ask(validator, miner, StoryGenerationSynapse(**fields))
    assert response.is_success
    assert message in response.output_data["error"]
    assert response.model_info["mode"] == "unknown"  # nothing generated: claim no model


def test_a_malformed_synapse_gets_a_clear_error_and_serving_goes_on(served):
    miner, validator, _ = served
    bad = StoryGenerationSynapse.model_construct(**{**examples.example_fields("characters"), "task_type": "poem",
                                                    "chapter_ids": {"1": 2}, "generation_time": "soon"})
    response = ask(validator, miner, bad)
    assert response.is_success and "task_type must be one of" in response.output_data["error"]
    # A non-string user_input straight on the wire, unsigned: refused before any generation.
    request = urllib.request.Request(f"http://127.0.0.1:{miner.axon.port}/StoryGenerationSynapse",
                                     data=json.dumps({"user_input": [1, 2]}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code >= 400
    after = ask(validator, miner, StoryGenerationSynapse(task_type="characters", user_input="x"))
    assert after.is_success and "needs blueprint" in after.output_data["error"]


@pytest.mark.parametrize("timeout", ["nan", "inf"])
def test_a_synapse_whose_timeout_is_nan_or_infinite_gets_a_clear_error(served, timeout):
    """bittensor lets such a timeout through: the header is read with float(), and the nonce check passes.
    A validator's Dendrite signs the request; the timeout is set by hand, as a broken client would send it."""
    miner, validator, _ = served
    synapse = validator.preprocess_synapse_for_request(
        miner.axon.info(), StoryGenerationSynapse(**examples.example_fields("blueprint")), timeout=60)
    request = urllib.request.Request(
        f"http://127.0.0.1:{miner.axon.port}/StoryGenerationSynapse", method="POST",
        data=json.dumps({**synapse.model_dump(), "timeout": float(timeout)}).encode(),
        headers={**synapse.to_headers(), "timeout": timeout, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        reply = json.loads(response.read())
    assert reply["output_data"]["error"].startswith("timeout must be a finite number of seconds above 0")
    assert reply["output_data"]["error"].endswith(f"got {timeout}")
    assert reply["timeout"] == VALIDATOR_TIMEOUT_S  # echoed as JSON can write it: NaN and infinity it cannot


class WaitsForCancel(FakeBackend):
    """Works on its answer until the request is cancelled, then stops as the engine does."""

    def __init__(self, name: str):
        super().__init__(name)
        self.started = threading.Event()

    def generate(self, request: Request) -> Generation:
        self.history.append(request)
        self.started.set()
        if request.cancelled.wait(30):
            raise BackendError("the request was cancelled: its caller has gone away")
        raise BackendError("never cancelled")


def test_a_cancelled_forward_tells_the_backend_its_caller_has_gone(tmp_path):
    backend = WaitsForCancel("local")
    miner = Miner(Config(), StoryService(chain_of(backend), GenerationSettings()),
                  make_wallet(str(tmp_path), "miner"), offline=True)

    async def cancel_while_answering():
        forward = asyncio.ensure_future(miner.forward(StoryGenerationSynapse(**examples.example_fields("blueprint"))))
        assert await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 30)
        forward.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forward

    try:
        asyncio.run(cancel_while_answering())
        assert backend.history[0].cancelled.wait(5)
    finally:
        miner.close()


def test_concurrent_requests_queue_and_all_answer(served):
    miner, validator, _ = served
    synapse = StoryGenerationSynapse(task_type="blueprint", user_input="A story about time travel")

    async def both():
        return await validator.forward(axons=[miner.axon.info()] * 2, synapse=synapse, timeout=60, deserialize=False)

    responses = asyncio.run(both())
    outputs = [r.output_data for r in responses]
    assert all(r.is_success for r in responses)
    for output in outputs:
        TASKS["blueprint"].check(answer_of(output), Context(user_input="x"))
    assert outputs[0]["title"] != outputs[1]["title"] or outputs[0]["setting"] != outputs[1]["setting"]
