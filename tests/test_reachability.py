"""Can validators reach the miner? The chain's advertised axon against what the miner serves, against an
in-memory metagraph (no chain runs here), and the silence check on explicit clocks; then a chain-mode miner
(a real Axon on loopback, the chain in memory) reporting both in its log and in `health --running`."""
from __future__ import annotations

import dataclasses
import logging

import bittensor as bt
import pytest
from bittensor_wallet import Keypair

from miner import examples
from miner.neuron import no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from miner.reachability import QUIET_AFTER_S, Endpoint, advertised, chain_finding, requests_finding
from tests.fakes import Metagraph, Neuron, Subtensor

MINER = Keypair.create_from_uri("//storynet-reach-miner").ss58_address
OTHER = Keypair.create_from_uri("//storynet-reach-other").ss58_address
PUBLIC = "5.9.10.11"  # any public address: nothing is sent to it
SERVED = Endpoint(PUBLIC, 8091)


def on_chain(ip: str, port: int) -> Endpoint | None:
    """What the miner reads back for its hotkey from a metagraph whose entry for it is (ip, port)."""
    chain = Subtensor([Neuron(OTHER, 10.0, True, "8.8.8.8", 8091), Neuron(MINER, ip=ip, port=port)])
    return advertised(Metagraph(chain), MINER)


def test_the_right_entry_is_ok():
    finding = chain_finding(on_chain(PUBLIC, 8091), SERVED, 8091)
    assert finding.ok is True and finding.detail == f"the chain advertises {PUBLIC}:8091, what this miner serves"


def test_an_entry_of_0_0_0_0_means_no_axon():
    finding = chain_finding(on_chain("0.0.0.0", 0), SERVED, 8091)
    assert finding.ok is False
    assert "the chain advertises 0.0.0.0:0, no axon: serving it on chain failed" in finding.detail


@pytest.mark.parametrize("ip, says", [
    ("192.168.1.20", "192.168.1.20 is a private (LAN) address that validators on the internet cannot reach: set "
                     "axon.external_ip"),
    ("10.0.0.7", "10.0.0.7 is a private (LAN) address"),
    ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ("100.72.9.1", "100.72.9.1 is a carrier-grade NAT address"),
    ("0.0.0.0", "0.0.0.0 means no axon at all"),
])
def test_a_private_entry_served_as_configured_is_still_unreachable(ip, says):
    finding = chain_finding(on_chain(ip, 8091), Endpoint(ip, 8091), 8091)
    assert finding.ok is False and says in finding.detail


def test_another_port_or_address_on_chain_is_named():
    port = chain_finding(on_chain(PUBLIC, 8091), Endpoint(PUBLIC, 9000), 9000)
    assert port.ok is False
    assert f"the chain advertises {PUBLIC}:8091, this miner serves {PUBLIC}:9000, so validators go to another port" \
        in port.detail
    address = chain_finding(on_chain("8.8.4.4", 8091), SERVED, 8091)
    assert address.ok is False and "validators go to another address" in address.detail


def test_a_deregistered_hotkey_is_named():
    gone = advertised(Metagraph(Subtensor([Neuron(OTHER)])), MINER)
    assert gone is None
    assert "no longer in the subnet's metagraph" in chain_finding(gone, SERVED, 8091).detail


def test_a_forwarded_port_is_ok_and_says_what_the_router_must_do():
    finding = chain_finding(on_chain(PUBLIC, 443), Endpoint(PUBLIC, 443), 8091)
    assert finding.ok is True and "the router must forward port 443 to this machine's port 8091" in finding.detail


def quiet(now: float, last: float | None = None, refused: int = 0, why: str | None = None):
    return requests_finding(now, served_at=1000.0, last_request=last, refused=refused, last_refusal=why,
                            served=SERVED)


def test_silence_is_judged_only_after_ten_minutes():
    early = quiet(1000.0 + QUIET_AFTER_S - 1)
    assert early.ok is None and early.detail.startswith("no validator request yet, 9 min since the axon was served; "
                                                     "judged after 10 min")
    late = quiet(1000.0 + QUIET_AFTER_S + 60)
    assert late.ok is False and late.detail.startswith("no validator request in the 11 min since the axon was served")
    assert "nothing reached the axon: port 8091 is closed or not forwarded" in late.detail
    assert f"nc -vz {PUBLIC} 8091" in late.detail


def test_silence_after_refusals_points_at_the_blacklist():
    finding = quiet(1000.0 + 2 * QUIET_AFTER_S, refused=7, why="caller stake 40.0 below blacklist.min_stake")
    assert finding.ok is False
    assert "7 requests reached the axon but were refused (last: caller stake 40.0 below blacklist.min_stake)" \
        in finding.detail and "nothing reached" not in finding.detail


def test_a_recent_request_is_ok_and_an_old_one_is_silence_again():
    assert quiet(5000.0, last=4970.0) == (True, "last validator request 30 s ago")
    stale = quiet(5000.0, last=5000.0 - QUIET_AFTER_S - 120)
    assert stale.ok is False and stale.detail.startswith("no validator request in the 12 min since the last one")


# --- a chain-mode miner: a real Axon on loopback, the chain in memory ---------------------------------------------

@pytest.mark.slow
def test_a_miner_serving_a_public_address_reports_it_and_counts_a_validators_request(chain_miner, running_health,
                                                                                     caplog):
    with caplog.at_level(logging.INFO, logger="miner.health_monitor"):
        served = chain_miner(PUBLIC)
    axon = served.miner.axon
    assert f"chain: the chain advertises {PUBLIC}:{axon.port}, what this miner serves" in caplog.text
    code, out = running_health(served.config)
    assert code == 0 and out.startswith("HEALTHY (exit 0)")
    assert "no validator request yet" in out

    with no_public_ip_lookup():
        dendrite = bt.Dendrite(wallet=served.validator)
    loopback = dataclasses.replace(axon.info(), ip="127.0.0.1")  # the advertised address is only a label here
    reply = dendrite.query(axons=[loopback], synapse=StoryGenerationSynapse(**examples.example_fields("blueprint")),
                           timeout=30, deserialize=True)[0]
    assert reply["title"] == examples.BLUEPRINT["title"]  # answered by forward: the request got there
    code, out = running_health(served.config)
    assert code == 0 and "last validator request" in out


@pytest.mark.slow
def test_a_miner_serving_a_private_address_is_degraded_with_the_reason(chain_miner, running_health, caplog):
    with caplog.at_level(logging.WARNING, logger="miner.health_monitor"):
        served = chain_miner("192.168.1.20")
    assert "chain: 192.168.1.20 is a private (LAN) address" in caplog.text
    code, out = running_health(served.config)
    assert code == 1
    assert out.startswith("DEGRADED (exit 1): serving on custom, but validators may not reach it: see chain below")
    chain_row = next(line for line in out.splitlines() if line.startswith("chain "))
    assert chain_row.split()[1] == "down" and "set axon.external_ip" in chain_row


@pytest.mark.slow
def test_a_failed_serve_is_logged_and_the_chain_row_says_no_axon(chain_miner, running_health, caplog):
    with caplog.at_level(logging.WARNING):
        served = chain_miner(PUBLIC, serve_fails="rate limit exceeded: wait 50 blocks")
    assert "serving the axon on chain failed: rate limit exceeded: wait 50 blocks" in caplog.text
    code, out = running_health(served.config)
    assert code == 1 and "the chain advertises 0.0.0.0:0, no axon" in out
