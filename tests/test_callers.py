"""Who may call in chain mode: blacklist and priority against a metagraph built in memory (the chain
itself cannot run here), and through a real Axon on loopback, the refusal before the body is read."""
from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request
from pathlib import Path

import bittensor as bt
import pytest
from bittensor_wallet import Keypair

from backends.chain import Chain
from backends.custom_command import CustomSettings
from miner import examples
from miner.config import BlacklistSettings, ChainSettings, Config, GenerationSettings, load_config
from miner.demo import free_port, make_wallet
from miner.errors import ConfigError
from miner.neuron import LOOPBACK, Miner, no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from miner.service import StoryService
from tests.fakes import BLUEPRINT, NETUID, Metagraph, Neuron, Subtensor


def metagraph_of(rows: list[tuple[str, float, bool]]) -> Metagraph:
    """What CallerTable reads of the chain: hotkeys, stakes and permits."""
    return Subtensor([Neuron(hotkey, stake, permit) for hotkey, stake, permit in rows]).metagraph(NETUID)


def hotkey(name: str) -> str:
    return Keypair.create_from_uri(f"//storynet-{name}").ss58_address


VALIDATOR, SMALL_VALIDATOR, NO_PERMIT, OPERATOR, STRANGER = (
    hotkey(n) for n in ("validator", "small-validator", "no-permit", "operator", "stranger"))
METAGRAPH = metagraph_of([(VALIDATOR, 5000.0, True), (SMALL_VALIDATOR, 40.0, True), (NO_PERMIT, 900.0, False)])

# Answers with the example blueprint, and notes each run: it shows whether a request reached generation.
RECORDING_PROGRAM = """
import json, pathlib, sys
json.load(sys.stdin)
with open(sys.argv[1], "a") as runs:
    runs.write("run\\n")
print(json.dumps({"text": json.dumps(BLUEPRINT)}))
"""


def recording_service(tmp_path: Path) -> tuple[StoryService, Path]:
    runs = tmp_path / "runs.log"
    program = tmp_path / "answer.py"
    program.write_text(f"#!{sys.executable}\nBLUEPRINT = {BLUEPRINT!r}\n{RECORDING_PROGRAM}")
    program.chmod(0o755)
    settings = CustomSettings(type="custom", name="recorder", command=[str(program), str(runs)])
    return StoryService(Chain.from_config([settings], ChainSettings()), GenerationSettings(target_s=55)), runs


@pytest.fixture
def chain_miner(tmp_path):
    """A chain-mode miner (offline=False) that never touches a chain: the metagraph is set directly."""
    def build(**rules) -> Miner:
        service, _ = recording_service(tmp_path)
        config = Config(blacklist=BlacklistSettings(**rules))
        miner = Miner(config, service, make_wallet(str(tmp_path), "miner"), offline=False)
        miner.callers.update(METAGRAPH)
        built.append(miner)
        return miner

    built: list[Miner] = []
    yield build
    for miner in built:
        miner.close()
        miner.service.chain.close()


def from_caller(hotkey: str | None) -> StoryGenerationSynapse:
    return StoryGenerationSynapse(dendrite=bt.TerminalInfo(hotkey=hotkey))


def blacklist(miner: Miner, hotkey: str | None) -> tuple[bool, str]:
    return asyncio.run(miner.blacklist(from_caller(hotkey)))


def test_an_unregistered_hotkey_is_refused_unless_the_config_allows_it(chain_miner):
    assert blacklist(chain_miner(), STRANGER) == (True, "hotkey not registered")
    assert blacklist(chain_miner(require_registered=False), STRANGER) == (False, "unregistered allowed")
    assert blacklist(chain_miner(), VALIDATOR) == (False, "registered caller")


def test_a_request_without_a_hotkey_is_refused(chain_miner):
    assert blacklist(chain_miner(require_registered=False), None) == (True, "request carries no hotkey")
    assert asyncio.run(chain_miner().blacklist(StoryGenerationSynapse(dendrite=None)))[0]


def test_a_caller_without_a_validator_permit_is_refused_when_one_is_required(chain_miner):
    assert blacklist(chain_miner(), NO_PERMIT) == (False, "registered caller")
    strict = chain_miner(require_validator_permit=True)
    assert blacklist(strict, NO_PERMIT) == (True, "caller has no validator permit")
    assert blacklist(strict, VALIDATOR) == (False, "registered caller")


def test_stake_below_min_stake_is_refused(chain_miner):
    miner = chain_miner(min_stake=40.0)
    assert blacklist(miner, SMALL_VALIDATOR) == (False, "registered caller")  # exactly the minimum
    miner = chain_miner(min_stake=100.0)
    refused, why = blacklist(miner, SMALL_VALIDATOR)
    assert refused and why == "caller stake 40.0 below blacklist.min_stake"
    assert blacklist(miner, VALIDATOR) == (False, "registered caller")


def test_force_allow_lets_the_operators_hotkeys_through_every_rule(chain_miner):
    strict = {"require_validator_permit": True, "min_stake": 1000.0}
    miner = chain_miner(**strict, force_allow=[OPERATOR, NO_PERMIT, SMALL_VALIDATOR])
    for caller in (OPERATOR, NO_PERMIT, SMALL_VALIDATOR):  # unregistered, no permit, too little stake
        assert blacklist(miner, caller) == (False, "in blacklist.force_allow")
    assert blacklist(miner, STRANGER) == (True, "hotkey not registered")
    assert blacklist(chain_miner(**strict), NO_PERMIT)[0]


def test_force_allow_is_ignored_offline_where_the_allowlist_rules(tmp_path):
    service, _ = recording_service(tmp_path)
    config = Config(blacklist=BlacklistSettings(force_allow=[OPERATOR]))
    miner = Miner(config, service, make_wallet(str(tmp_path), "miner"), offline=True)
    try:
        assert blacklist(miner, OPERATOR) == (True, "hotkey not in offline.allowed_hotkeys")
    finally:
        miner.close()
        service.chain.close()


def test_a_force_allow_entry_that_is_not_a_hotkey_fails_at_start_naming_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"blacklist:\n  force_allow: [{OPERATOR}, {OPERATOR[:-1]}x, my-hotkey]\n")
    with pytest.raises(ConfigError, match=r"blacklist.force_allow: .*not ss58 hotkey addresses: "
                                          rf"'{OPERATOR[:-1]}x', 'my-hotkey'"):
        load_config(path)


def test_priority_follows_stake(chain_miner):
    miner = chain_miner(force_allow=[OPERATOR])
    priorities = {h: asyncio.run(miner.priority(from_caller(h)))
                  for h in (VALIDATOR, NO_PERMIT, SMALL_VALIDATOR, OPERATOR, STRANGER)}
    assert priorities == {VALIDATOR: 5000.0, NO_PERMIT: 900.0, SMALL_VALIDATOR: 40.0, OPERATOR: 0.0, STRANGER: 0.0}
    assert asyncio.run(miner.priority(StoryGenerationSynapse(dendrite=None))) == 0.0


def test_a_resync_replaces_who_may_call(chain_miner):
    miner = chain_miner()
    miner.callers.update(metagraph_of([(STRANGER, 10.0, True), (NO_PERMIT, 900.0, False)]))
    assert blacklist(miner, STRANGER) == (False, "registered caller")
    assert blacklist(miner, VALIDATOR) == (True, "hotkey not registered")  # deregistered
    assert asyncio.run(miner.priority(from_caller(STRANGER))) == 10.0


def post(port: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/StoryGenerationSynapse", data=body,
                                     method="POST", headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def ask(dendrite: bt.Dendrite, axon_info) -> StoryGenerationSynapse:
    try:
        synapse = StoryGenerationSynapse(**examples.example_fields("blueprint"))
        return (await dendrite.forward(axons=[axon_info], synapse=synapse, timeout=60, deserialize=False))[0]
    finally:
        await dendrite.aclose_session()


@pytest.mark.slow
def test_through_a_real_axon_the_refusal_comes_before_the_body_is_read(tmp_path):
    wallets = str(tmp_path)
    validator, stranger = make_wallet(wallets, "validator"), make_wallet(wallets, "stranger")
    service, runs = recording_service(tmp_path)
    port = free_port()
    miner = Miner(Config(generation=GenerationSettings(target_s=55)), service, make_wallet(wallets, "miner"),
                  offline=False)
    miner.callers.update(metagraph_of([(validator.hotkey.ss58_address, 100.0, True)]))
    # Miner.start() in chain mode would connect to the chain and serve the axon there: the same Axon,
    # wired to the same three functions, on loopback instead.
    with no_public_ip_lookup():
        miner.axon = bt.Axon(wallet=miner.wallet, port=port, ip=LOOPBACK, external_ip=LOOPBACK)
        miner.axon.fast_server.config.host = LOOPBACK
        miner.axon.attach(forward_fn=miner.forward, blacklist_fn=miner.blacklist, priority_fn=miner.priority)
        miner.axon.start()
        Miner._wait_listening(miner.axon)
        try:
            def signed_headers(wallet) -> dict[str, str]:
                synapse = bt.Dendrite(wallet=wallet).preprocess_synapse_for_request(
                    miner.axon.info(), StoryGenerationSynapse(), timeout=30)
                return synapse.to_headers()

            garbage = b'{"user_input": "never parsed", broken'
            status, headers, _ = post(port, signed_headers(stranger), garbage)
            assert status == 403 and "blacklisted: hotkey not registered" in headers["bt_header_axon_status_message"]
            assert not runs.exists()  # nothing was generated

            # The same body from a registered caller gets past the blacklist and fails where it is parsed.
            status, headers, _ = post(port, signed_headers(validator), garbage)
            assert status != 403 and "blacklisted" not in headers.get("bt_header_axon_status_message", "")
            assert not runs.exists()

            # And a well-formed request from the stranger through a real Dendrite is refused the same way.
            # Dendrites live outside the event loop: their destructor must not run inside it.
            from_stranger, from_validator = bt.Dendrite(wallet=stranger), bt.Dendrite(wallet=validator)
            refused = asyncio.run(ask(from_stranger, miner.axon.info()))
            assert refused.dendrite.status_code == 403 and refused.output_data is None
            assert not runs.exists()

            answered = asyncio.run(ask(from_validator, miner.axon.info()))
            assert answered.is_success and "error" not in answered.output_data, answered.output_data
            assert answered.output_data["title"] == BLUEPRINT["title"]
            assert runs.read_text() == "run\n"
        finally:
            miner.close()
            service.chain.close()
