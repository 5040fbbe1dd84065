"""GET /metrics on the health port, in Prometheus' text format, made with prometheus-client: what the miner
answered (by task, outcome and backend), how long answers took against the validators' 30 s of full time
points, what it generates and what it is doing now. docs/monitoring.md has the scrape config and queries.

Each miner has its own registry (tests run several in one process). Label values come only from fixed sets
(tasks, outcomes, refusal reasons, the YAML's backend names) or are capped (protocol versions: see
miner/activity.py): no caller can grow the label set, and no secret or key is ever a label.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from backends.chain import Chain
from miner import PROTOCOL_VERSION, __version__
from miner.earnings import Earnings

# Validators give full time points up to 30 s and none from 60 s (docs/protocol.md): edges around both.
ANSWER_BUCKETS = (1, 2.5, 5, 10, 15, 20, 25, 30, 40, 50, 60)


class _Now:
    """Gauges read when scraped: the backends' queues, learned speed, last step and restarts, the GPU's memory,
    the earnings."""

    def __init__(self, chain: Chain, earnings: Callable[[], Earnings | None]):
        self.chain, self.earnings = chain, earnings

    def collect(self) -> Iterator[Any]:
        running = GaugeMetricFamily("storynet_running_answers", "Answers being generated", labels=["backend"])
        waiting = GaugeMetricFamily("storynet_waiting_requests", "Requests queued for a decoding slot",
                                    labels=["backend"])
        speed = GaugeMetricFamily("storynet_decode_tokens_per_second",
                                  "Decode speed the engine learned, by sequences decoding together",
                                  labels=["backend", "sequences"])
        step_age = GaugeMetricFamily("storynet_engine_last_step_age_seconds",
                                     "Seconds since the engine last finished a step (high while it is busy: a stall)",
                                     labels=["backend"])
        restarts = CounterMetricFamily("storynet_engine_restarts", "Engine processes restarted after dying or "
                                       "stalling", labels=["backend"])
        memory = None
        for backend in self.chain.backends:
            gauges = backend.gauges()
            if gauges is None:
                continue
            running.add_metric([backend.name], gauges.running)
            waiting.add_metric([backend.name], gauges.waiting)
            for n, tok_s in sorted(gauges.decode_tok_s.items()):
                speed.add_metric([backend.name, str(n)], tok_s)
            if gauges.last_step_age_s is not None:
                step_age.add_metric([backend.name], gauges.last_step_age_s)
            if gauges.restarts is not None:
                restarts.add_metric([backend.name], gauges.restarts)
            memory = memory or gauges.gpu_memory
        yield from (running, waiting, speed, step_age, restarts)
        if memory is not None:  # from the engine that holds the GPU: asking here would make a CUDA context
            yield GaugeMetricFamily("storynet_gpu_memory_used_bytes", "Memory used on the first GPU, by anyone",
                                    value=memory[0])
            yield GaugeMetricFamily("storynet_gpu_memory_total_bytes", "Memory of the first GPU", value=memory[1])
        earned = self.earnings()
        if earned is not None:
            for name, value, text in (
                    ("incentive", earned.incentive, "This hotkey's incentive in the metagraph"),
                    ("emission", earned.emission, "Alpha this uid received at its last epoch"),
                    ("consensus", earned.consensus, "This uid's consensus in the metagraph"),
                    ("incentive_rank", earned.rank, "Place by incentive among the subnet's miners (1 is first)"),
                    ("subnet_miners", earned.miners, "Uids without a validator permit, this one included"),
                    ("immunity_left_blocks", earned.immunity_left_blocks, "Blocks of immunity left")):
                yield GaugeMetricFamily(f"storynet_{name}", text, value=value)
            if earned.weights_blocks_ago is not None:
                yield GaugeMetricFamily("storynet_weights_set_blocks_ago",
                                        "Blocks since any validator last set weights", value=earned.weights_blocks_ago)


class Metrics:
    def __init__(self, chain: Chain, earnings: Callable[[], Earnings | None] = lambda: None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("storynet_requests", "Requests answered, by task, outcome (valid, busy, error) "
                                "and the backend that answered (none: no backend did)",
                                ["task", "outcome", "backend"], registry=r)
        self.answer_seconds = Histogram("storynet_answer_seconds", "Seconds from arrival to answer, valid answers",
                                        ["task"], buckets=ANSWER_BUCKETS, registry=r)
        self.tokens = Counter("storynet_generated_tokens", "Tokens generated in valid answers", ["backend"],
                              registry=r)
        self.protocol = Counter("storynet_protocol_requests", "Requests by the protocol_version they carry",
                                ["version"], registry=r)
        self.refused = Counter("storynet_refused_requests", "Validators' requests refused before an answer was "
                               "tried, by reason", ["reason"], registry=r)
        r.register(_Now(chain, earnings))
        Info("storynet_miner", "This miner", registry=r).info({"version": __version__, "protocol": PROTOCOL_VERSION})

    def version(self, label: str) -> None:
        self.protocol.labels(label).inc()

    def answered(self, task: str, outcome: str, backend: str, seconds: float, tokens: int) -> None:
        self.requests.labels(task, outcome, backend).inc()
        if outcome == "valid":
            self.answer_seconds.labels(task).observe(seconds)
            self.tokens.labels(backend).inc(tokens)

    def refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
