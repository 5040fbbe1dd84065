"""The operator's view: protocol drift named the day it arrives, refusals before an answer counted by reason,
the earnings row of the metagraph, the last ten minutes, and /metrics parsed with prometheus-client's own
parser. The record and the earnings on explicit clocks and an in-memory metagraph; then a chain-mode miner
(a real Axon on loopback, the chain in memory) asked by a validator's Dendrite speaking a future protocol."""
from __future__ import annotations

import dataclasses
import json
import logging
import urllib.request
from typing import Any, ClassVar, Dict, Optional, Tuple

import bittensor as bt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.chain import BackendStatus
from miner import __version__, examples
from miner.activity import FRESH_S, MAX_LABELS, OTHER, WINDOW_S, Activity
from miner.earnings import of as earnings_of
from miner.health import AxonState, Check, HealthReport
from miner.neuron import no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from tests.fakes import Metagraph, Neuron, Subtensor
from tests.validator_synapses import VALIDATOR_SYNAPSES

ME, VALIDATOR, OTHER_VALIDATOR = "5Me", "5Validator", "5OtherValidator"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(serves=lambda hotkey: hotkey != "5Stranger") -> tuple[Activity, Clock]:
    clock = Clock()
    return Activity(serves, clock=clock), clock


def backend_up() -> BackendStatus:
    return BackendStatus("local", "llama_cpp", "local", True, "fine", 0, 0)


# --- protocol drift and refusals -------------------------------------------------------------------------------

def test_a_new_protocol_version_is_warned_once_and_degrades_health_with_the_fix(caplog):
    activity, clock = record()
    activity.answered("blueprint", "valid", "local", 4.0, 200, "3.2.1", VALIDATOR)
    assert activity.checks()[0] == Check("protocol", True, "validators send 3.2.1 (1 request)")
    with caplog.at_level(logging.WARNING, logger="miner.activity"):
        for caller in (VALIDATOR, OTHER_VALIDATOR, VALIDATOR):
            clock.now += 60
            activity.answered("blueprint", "valid", "local", 4.0, 200, "3.3.0", caller)
    warnings = [r.getMessage() for r in caplog.records if "protocol drift" in r.getMessage()]
    assert len(warnings) == 1 and "'3.3.0'" in warnings[0] and "git pull" in warnings[0]
    protocol = activity.checks()[0]
    assert protocol.ok is False
    assert "'3.3.0' from 2 validators since " in protocol.detail and "(3 requests)" in protocol.detail
    assert "git pull && scripts/setup.sh" in protocol.detail and "restart" in protocol.detail
    report = HealthReport.of([backend_up()], AxonState("127.0.0.1:1", True, "up"), "test", "test", activity.checks())
    assert report.status == "degraded"
    assert report.summary == ("serving on local, but validators send a protocol this miner does not speak: "
                              "see protocol below")
    clock.now += FRESH_S + 1  # validators went back, or the miner was updated and restarted
    assert activity.checks()[0].ok is True


def test_refusals_are_counted_by_reason_with_the_first_error_and_only_from_served_callers():
    activity, clock = record()
    activity.refused("body does not parse", "user_input: Input should be a valid string", "5Stranger", "9.9.9")
    assert activity.checks()[1].ok is None and activity.versions == {}  # anyone may send junk
    activity.refused("body does not parse", "the header computed_body_hash does not match", VALIDATOR, "3.3.0")
    clock.now += 5
    activity.refused("unknown synapse", "validators call /StoryV4", VALIDATOR)
    activity.refused("body does not parse", "a later one", OTHER_VALIDATOR)
    refused = activity.checks()[1]
    assert refused.ok is False
    assert refused.detail.startswith("3 requests of validators: 2 body does not parse, 1 unknown synapse; the first: "
                                     "body does not parse: the header computed_body_hash does not match")
    assert activity.versions["3.3.0"].count == 1  # a version read from a refused body counts too
    clock.now += FRESH_S + 10
    assert activity.checks()[1].ok is True and activity.checks()[1].detail.startswith("none in the last hour")


def test_callers_cannot_grow_the_versions_without_end():
    activity, _ = record()
    for i in range(3 * MAX_LABELS):
        activity.answered("blueprint", "valid", "local", 1.0, 10, f"3.{i}.0", VALIDATOR)
    activity.answered("blueprint", "valid", "local", 1.0, 10, {"not": "a string"}, VALIDATOR)
    activity.answered("blueprint", "valid", "local", 1.0, 10, "x" * 500, VALIDATOR)
    assert len(activity.versions) == MAX_LABELS + 1 and OTHER in activity.versions
    assert activity.versions[OTHER].count == 2 * MAX_LABELS + 2


# --- the last ten minutes --------------------------------------------------------------------------------------

def test_the_last_ten_minutes_beside_the_ten_before():
    activity, clock = record()
    start = clock.now
    for i, seconds in enumerate([3.0, 5.0, 7.0, 40.0]):  # the ten minutes before
        clock.now = start + 10 * i
        activity.answered("blueprint", "valid", "local", seconds, 100, "3.2.1", VALIDATOR)
    clock.now = start + WINDOW_S + 30
    activity.answered("blueprint", "busy", "none", 0.1, 0, "3.2.1", VALIDATOR)
    for i in range(20):
        activity.answered("chapters", "valid", "local", 10.0 + i, 600, "3.2.1", VALIDATOR)
    activity.answered("chapters", "error", "none", 0.2, 0, "3.2.1", VALIDATOR)
    clock.now = start + 2 * WINDOW_S - 1
    recent = activity.recent()
    tasks = recent["tasks"]
    assert tasks["blueprint"]["before"] == {"served": 4, "busy": 0, "errors": 0, "p50_s": 7.0, "p95_s": 40.0}
    assert tasks["blueprint"]["now"] == {"served": 0, "busy": 1, "errors": 0, "p50_s": None, "p95_s": None}
    assert tasks["chapters"]["now"] == {"served": 20, "busy": 0, "errors": 1, "p50_s": 20.0, "p95_s": 28.0}
    assert tasks["all"]["now"]["served"] == 20 and tasks["all"]["before"]["served"] == 4
    assert recent["tokens_per_s"] == {"now": 20.0, "before": 0.7}
    report = HealthReport.of([backend_up()], AxonState("127.0.0.1:1", True, "up"), "test", "test", recent=recent)
    table = report.render().split("\n\n")[-1].splitlines()
    assert table[0].split() == ["LAST", "10", "min", "(the", "10", "min", "before)", "SERVED", "BUSY", "ERRORS",
                                "P50", "S", "P95", "S"]
    assert table[1].split() == ["blueprint", "0", "(4)", "1", "(0)", "0", "(0)", "-", "(7.0)", "-", "(40.0)"]
    assert HealthReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    clock.now = start + 4 * WINDOW_S  # everything has aged out
    assert activity.recent()["tasks"] == {"all": {name: {"served": 0, "busy": 0, "errors": 0, "p50_s": None,
                                                         "p95_s": None} for name in ("now", "before")}}


# --- earnings --------------------------------------------------------------------------------------------------

def subnet(me: dict[str, Any], block: int = 10_000) -> Metagraph:
    miners = [Neuron(f"5Miner{i}", incentive=i / 100) for i in range(19)]  # 0.00 .. 0.18
    validators = [Neuron(VALIDATOR, 1000.0, True, incentive=0.9, last_update=block - 40),
                  Neuron(OTHER_VALIDATOR, 800.0, True, last_update=block - 300)]
    return Metagraph(Subtensor([*validators, Neuron(ME, **me), *miners], block=block, tempo=360,
                               immunity_period=5000))


def test_earnings_are_read_from_the_metagraph_the_miner_syncs():
    earned = earnings_of(subnet({"incentive": 0.175, "emission": 1.25, "consensus": 0.2, "registered_at": 8000}), ME)
    assert (earned.uid, earned.block, earned.incentive, earned.emission) == (2, 10_000, pytest.approx(0.175),
                                                                            pytest.approx(1.25))
    assert (earned.rank, earned.miners, earned.standing) == (2, 20, "top 10%")  # the validators are not miners
    assert earned.weights_blocks_ago == 40
    assert earned.immunity_left_blocks == 3000
    rows = dict(earned.rows())
    assert rows["incentive"] == "0.175000: 2nd of 20 miners (top 10%)"
    assert rows["emission"] == "1.250000 α per tempo (360 blocks)"
    assert rows["weights"] == "validators last set weights 40 blocks (~8 min) ago"
    assert rows["immunity"] == "3,000 blocks (~10.0 h) left"


@pytest.mark.parametrize("incentive, standing", [(0.095, "above the median"), (0.03, "bottom quarter"),
                                                 (0.0, "earning nothing: validators give it no weight yet")])
def test_where_the_hotkey_stands_among_the_miners(incentive, standing):
    earned = earnings_of(subnet({"incentive": incentive, "registered_at": 1}), ME)
    assert earned.standing == standing and earned.immunity_left_blocks == 0
    assert "none left" in dict(earned.rows())["immunity"]


def test_a_hotkey_not_in_the_metagraph_has_no_earnings():
    assert earnings_of(subnet({}), "5Deregistered") is None


# --- a chain-mode miner asked in a future protocol -------------------------------------------------------------

class Future:
    """The synapse as a future protocol might type it, from 3.2.1's: version 3.3.0, a field whose type changed
    (chapter_ids a mapping), a new field (style); then one that hashes body fields (required_hash_fields), and
    one renamed."""

    class StoryGenerationSynapse(VALIDATOR_SYNAPSES["3.2.1"]):
        protocol_version: str = "3.3.0"
        chapter_ids: Optional[Dict[str, int]] = None
        style: str = "noir"

    class Hashed:
        class StoryGenerationSynapse(VALIDATOR_SYNAPSES["3.2.1"]):
            protocol_version: str = "3.3.0"
            required_hash_fields: ClassVar[Tuple[str, ...]] = ("task_type", "user_input")

    class StoryGenerationSynapseV4(VALIDATOR_SYNAPSES["3.2.1"]):
        protocol_version: str = "4.0.0"


def row(report: str, name: str) -> str:
    """A row of the rendered report, its cells joined by one space."""
    return " ".join(next(line for line in report.splitlines() if line.startswith(name + " ")).split()[1:])


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text, read with prometheus-client's own parser: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return samples_of(response.read().decode())


@pytest.mark.slow
def test_a_future_protocol_through_a_real_axon_is_named_in_health_and_metrics(chain_miner, running_health, caplog):
    me = {"incentive": 0.05, "emission": 0.5, "consensus": 0.1, "registered_at": 900}
    with caplog.at_level(logging.WARNING, logger="miner"):
        served = chain_miner("5.9.10.11", row=me, others=(Neuron("5Other", incentive=0.2),))
        with no_public_ip_lookup():
            dendrite = bt.Dendrite(wallet=served.validator)
        axon = dataclasses.replace(served.miner.axon.info(), ip="127.0.0.1")

        def ask(synapse):
            return dendrite.query(axons=[axon], synapse=synapse, timeout=30, deserialize=False)[0]

        today = ask(StoryGenerationSynapse(**examples.example_fields("blueprint")))
        assert today.is_success and today.output_data["title"] == examples.BLUEPRINT["title"]
        code, out = running_health(served.config)
        assert code == 0 and row(out, "protocol") == "ok validators send 3.2.1 (1 request)"

        future = ask(Future.StoryGenerationSynapse(task_type="blueprint", user_input="一个关于时间的故事",
                                                   chapter_ids={"first": 1}))
        assert future.is_success and future.output_data["error"].startswith("chapter_ids must be a non-empty list")
        hashed = ask(Future.Hashed.StoryGenerationSynapse(task_type="blueprint", user_input="a story"))
        renamed = ask(Future.StoryGenerationSynapseV4(task_type="blueprint"))
    assert hashed.axon.status_code == 500 and "computed_body_hash does not match" in hashed.axon.status_message
    assert renamed.axon.status_code == 404 and "this miner serves /StoryGenerationSynapse" in renamed.axon.status_message
    assert "protocol drift: a validator" in caplog.text and "'3.3.0'" in caplog.text

    code, out = running_health(served.config)
    assert code == 1
    assert out.startswith("DEGRADED (exit 1): serving on custom, but validators send a protocol this miner does "
                          "not speak and validators' requests are refused before an answer: see protocol and "
                          "refused below")
    protocol = row(out, "protocol")
    assert protocol.startswith("down validators send protocol '3.3.0' from 1 validator since")
    assert "(2 requests)" in protocol and "git pull" in protocol
    refused = row(out, "refused")
    assert refused.startswith("down") and ("3 requests of validators: 1 fields out of contract, 1 body does not parse, 1 unknown synapse; the first: "
            "fields out of contract: chapter_ids must be a non-empty list") in refused
    assert row(out, "incentive") == "0.050000: 2nd of 2 miners (bottom quarter)"
    assert row(out, "emission") == "0.500000 α per tempo (360 blocks)"
    assert row(out, "immunity") == "4,900 blocks (~16.3 h) left"
    assert row(out, "blueprint").split()[:6] == ["1", "(0)", "0", "(0)", "1", "(0)"]

    code, out = running_health(served.config, "--json")
    report = json.loads(out)
    assert code == 1 and report["earnings"]["rank"] == 2
    assert report["recent"]["tasks"]["blueprint"]["now"]["errors"] == 1

    metrics = scrape(served.miner.health.server.port)
    sample = ("storynet_requests_total", (("backend", "custom"), ("outcome", "valid"), ("task", "blueprint")))
    assert metrics[sample] == 1
    assert metrics[("storynet_requests_total", (("backend", "none"), ("outcome", "error"), ("task", "blueprint")))] == 1
    assert metrics[("storynet_answer_seconds_bucket", (("le", "30.0"), ("task", "blueprint")))] == 1
    assert metrics[("storynet_answer_seconds_count", (("task", "blueprint"),))] == 1
    assert metrics[("storynet_protocol_requests_total", (("version", "3.3.0"),))] == 2
    assert metrics[("storynet_protocol_requests_total", (("version", "3.2.1"),))] == 1
    for reason in ("fields out of contract", "body does not parse", "unknown synapse"):
        assert metrics[("storynet_refused_requests_total", (("reason", reason),))] == 1
    assert metrics[("storynet_incentive_rank", ())] == 2 and metrics[("storynet_incentive", ())] == pytest.approx(0.05)
    assert metrics[("storynet_miner_info", (("protocol", "3.2.1"), ("version", __version__)))] == 1


def test_metrics_read_the_llama_cpp_engine_when_scraped(embedded_backend):
    """The gauges come from the engine at scrape time: its queue, its running answers, what it learned."""
    from backends.chain import BackendState, Chain
    from miner.metrics import Metrics
    from models import fit
    samples = samples_of(Metrics(Chain([BackendState(embedded_backend, "local")])).render().decode())
    assert samples[("storynet_running_answers", (("backend", "local"),))] == 0
    assert samples[("storynet_waiting_requests", (("backend", "local"),))] == 0
    learned = embedded_backend.engine.speed.snapshot()["decode_tok_s_by_sequences"]
    assert {n: samples[("storynet_decode_tokens_per_second", (("backend", "local"), ("sequences", str(n))))]
            for n in learned} == learned
    on_gpu = any(name == "storynet_gpu_memory_used_bytes" for name, _ in samples)
    assert on_gpu == (fit.gpu_memory() is not None)  # only with GPU offload
