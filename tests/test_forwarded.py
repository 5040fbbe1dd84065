"""Answers as a 3.2.1 validator forwards them to the scoring service (miner/forwarded.py): a real Axon and a
real Dendrite querying with the validator's own synapse class and deserializing as it does, every error
kind, and an OpenAI-compatible server on loopback whose answers carry keys that would break the validator's
rebuild. The embedded model's answers for each task go through the same replica in test_axon.py."""
from __future__ import annotations

import json

import bittensor as bt
import pytest

from backends.base import BackendBusy, BackendError
from backends.chain import Chain
from backends.openai_api import OpenAISettings
from miner import examples, service as service_module
from miner.config import ChainSettings, Config, GenerationSettings
from miner.contract import MINER_FIELDS, answer_of, error_of, unknown_model_info, with_miner_fields
from miner.demo import make_wallet, start_offline_miner
from miner.forwarded import RebuildRefused, StoryGenerationSynapse, forward, rebuild
from miner.neuron import no_public_ip_lookup
from miner.service import StoryService
from miner.tasks import TASKS, Context
from tests.fakes import BLUEPRINT
from tests.scripted_http import ScriptedHTTP
from tests.test_chain import completion

pytestmark = pytest.mark.slow  # a real Axon


# --- the replica itself, on the values the validator's synapse refuses ------------------------------------
REFUSED = {  # a key of output_data that names a synapse field, with a value its type refuses
    "task_type": "story", "user_input": None, "miner_version": 2, "blueprint": "see above",
    "characters": {"characters": [{"id": "protagonist"}]},  # 3.2.0's shape
    "chapter_ids": "1,2", "generation_time": "soon", "model_info": "gpt-4", "output_data": [1, 2],
}


@pytest.mark.parametrize("key", list(REFUSED))
def test_the_replica_raises_where_the_validator_would(key):
    with pytest.raises(RebuildRefused, match=f"output_data\\[{key!r}\\]"):
        rebuild({**BLUEPRINT, key: REFUSED[key]})
    assert forward({**BLUEPRINT, key: REFUSED[key]}, "blueprint").breaks_step


def test_the_replica_forwards_what_the_validator_reads_off_its_rebuilt_synapse():
    bare = forward(dict(BLUEPRINT), "blueprint")  # what this miner sent before task_type was in output_data
    assert bare.entry == {"output_data": BLUEPRINT, "generation_time": 0.0, "task_type": "", "model_info": None}
    assert len(bare.problems) == 3  # task_type "", generation_time 0.0 by default, model_info missing
    old_key = forward({**BLUEPRINT, "_model_info": {"mode": "local"}, "generation_time": 2}, "blueprint")
    assert old_key.entry["model_info"] == {"mode": "local"} and old_key.entry["generation_time"] == 2.0
    output = with_miner_fields(BLUEPRINT, "blueprint", {"mode": "local", "name": "m"}, 1.25)
    whole = forward(output, "blueprint")
    assert whole.problems == [] and whole.task_type == "blueprint"
    assert whole.entry == {"output_data": output, "generation_time": 1.25, "task_type": "blueprint",
                           "model_info": {"mode": "local", "name": "m"}}
    assert forward(output, "characters").problems == [
        "forwarded with task_type 'blueprint', not the step's 'characters'"]
    assert forward(None, "blueprint").problems == ["no answer came back"]


def test_a_request_whose_task_type_the_synapse_refuses_is_answered_with_one_it_takes():
    output = with_miner_fields({"error": "task_type must be one of ...", "error_kind": "input"}, "poem", None, 0.0)
    assert output["task_type"] == "" and output["model_info"] == unknown_model_info()
    assert not forward(output, "").problems


def test_a_contract_check_keeps_only_the_contract_keys():
    extra = {**BLUEPRINT, **REFUSED, "notes": "from the API"}
    assert TASKS["blueprint"].check(extra, Context(user_input="x")) == BLUEPRINT
    assert list(TASKS["blueprint"].check(extra, Context(user_input="x"))) == list(BLUEPRINT)


# --- through a real Axon: every error kind ------------------------------------------------------------------
def ask_as_321(dendrite, miner, fields: dict):
    """As a 3.2.1 validator queries: its own synapse class, deserialized."""
    return dendrite.query(axons=[miner.axon.info()], synapse=StoryGenerationSynapse(**fields), timeout=60,
                          deserialize=True)[0]


def test_an_answer_is_forwarded_with_its_task_and_the_miners_fields(miner_from_memory):
    miner, backend, validator = miner_from_memory
    backend.enqueue(json.dumps(BLUEPRINT))
    output = ask_as_321(validator, miner, examples.validator_fields("blueprint", examples.VALIDATOR_PROMPTS[0]))
    sent = forward(output, "blueprint")
    assert sent.problems == [] and sent.task_type == "blueprint"
    assert answer_of(sent.entry["output_data"]) == BLUEPRINT
    assert sent.entry["model_info"]["mode"] == "custom" and isinstance(sent.entry["generation_time"], float)


@pytest.mark.parametrize("kind", ["input", "busy", "failed", "internal"])
def test_every_error_kind_is_forwarded_whole(miner_from_memory, monkeypatch, kind):
    miner, backend, validator = miner_from_memory
    fields = examples.validator_fields("characters", examples.VALIDATOR_PROMPTS[1])
    if kind == "input":
        fields["blueprint"] = None
    elif kind == "busy":
        backend.enqueue(BackendBusy("busy: with 4 answers decoding, the answer cannot be written in the 3 s left"))
    elif kind == "failed":
        backend.enqueue(BackendError("the model file is gone"))
    else:
        def broken(fields, settings):
            raise KeyError("a bug")
        monkeypatch.setattr(service_module, "prepare", broken)
    output = ask_as_321(validator, miner, fields)
    assert error_of(output)[0] == kind
    sent = forward(output, "characters")
    assert sent.problems == [] and sent.task_type == "characters"
    assert sent.entry["model_info"] == unknown_model_info() and sent.entry["output_data"] == output
    assert set(output) == {"error", "error_kind", *MINER_FIELDS}


# --- an API that adds keys of its own ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_served(tmp_path_factory):
    """An offline miner whose only backend is an OpenAI-compatible server on loopback that answers as
    scripted; yields (miner, server, validator dendrite)."""
    api = ScriptedHTTP()
    wallets = str(tmp_path_factory.mktemp("wallets"))
    validator = make_wallet(wallets, "validator")
    settings = OpenAISettings(type="openai", name="cloud", model="gpt-test", base_url=f"{api.url}/v1",
                              api_key_env=None, max_retries=0)
    service = StoryService(Chain.from_config([settings], ChainSettings()), GenerationSettings())
    with no_public_ip_lookup():
        miner = start_offline_miner(Config(), service, wallets, [validator.hotkey.ss58_address])
        try:
            yield miner, api, bt.Dendrite(wallet=validator)
        finally:
            miner.close()
            api.close()


@pytest.mark.parametrize("key", list(REFUSED))
def test_keys_an_api_adds_never_reach_the_validators_rebuild(api_served, key):
    miner, api, validator = api_served
    api.replies.append((200, completion(json.dumps({**BLUEPRINT, key: REFUSED[key], "commentary": "extra"}))))
    output = ask_as_321(validator, miner, examples.validator_fields("blueprint", examples.VALIDATOR_PROMPTS[2]))
    sent = forward(output, "blueprint")
    assert sent.problems == [], sent.problems
    assert answer_of(output) == BLUEPRINT  # the answer still counts, whole, and only the contract's keys
    assert output["model_info"]["mode"] == "api" and output["task_type"] == "blueprint"
    sent_schema = json.dumps(api.requests[-1]["body"]["response_format"]["json_schema"]["schema"])
    assert "minLength" in sent_schema and "x-" not in sent_schema and "pattern" not in sent_schema  # plain JSON Schema
