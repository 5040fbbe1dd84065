"""The tests' fakes, each defined once: a backend that answers from a queue, a matcher that fails on cue,
an answer to serve, and the chain in memory. Everything else in the tests is real.

The chain in memory stands at the one boundary the miner crosses to reach it: the calls it makes on
bittensor's Subtensor (registration, the metagraph, serving its axon) and what it reads of the Metagraph
(axons, stakes, permits, incentives, emissions, weight updates, registration blocks). No chain can run here; everything on the miner's side of these objects is real,
and AxonInfo and ExtrinsicResponse are bittensor's own."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from bittensor.core.chain_data import AxonInfo
from bittensor.core.types import ExtrinsicResponse
from bittensor.utils.networking import ip_version

from backends.base import Backend, Generation, Health, ModelInfo, Request
from backends.chain import BackendState, Chain
from backends.constraint import Matcher
from miner.errors import BackendError

# A blueprint that meets the contract, as an API backend would return it.
BLUEPRINT = {
    "title": "The Tide Clock", "genre": "mystery",
    "setting": "A harbour town where the tide clock in the square has stopped and the boats no longer return.",
    "core_conflict": "A young clockmaker must restart the clock before the last fleet is lost at sea.",
    "themes": ["time", "duty"], "tone": "brooding", "target_audience": "young adult readers"}


class FakeBackend(Backend):
    """Answers from a queue: a string is the text, an exception is raised. Records each request."""
    type = "custom"

    def __init__(self, name: str):
        super().__init__(name)
        self.queue: deque = deque()
        self.history: list[Request] = []
        self.healthy = Health(True, "fake: fine")

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.label)

    def enqueue(self, *outcomes) -> FakeBackend:
        self.queue.extend(outcomes)
        return self

    def generate(self, request: Request) -> Generation:
        self.history.append(request)
        outcome = self.queue.popleft()
        if isinstance(outcome, BaseException):
            raise outcome
        return Generation(text=outcome, prompt_tokens=1, completion_tokens=1, seconds=0.0, backend=self.name,
                          model=self.info())

    def health(self) -> Health:
        return self.healthy

    def info(self) -> ModelInfo:
        return ModelInfo("custom", self.name, "fake")


def chain_of(*backends: Backend, cooldown_s: float = 60.0) -> Chain:
    return Chain([BackendState(b, b.name) for b in backends], failures_before_cooldown=2, cooldown_s=cooldown_s)


class RefusesAfter(Matcher):
    """A real matcher that fails after a few tokens, as a constraint bug would."""

    def __init__(self, inner: Matcher, tokens: int):
        super().__init__(inner.ll, inner.bits.shape[1] * 32)
        self.left = tokens

    def consume(self, tokens: list[int]) -> None:
        self.left -= len(tokens)
        if self.left < 0:
            raise BackendError("the constraint refused a token: injected")
        super().consume(tokens)


NETUID = 92


@dataclass
class Neuron:
    hotkey: str
    stake: float = 0.0
    validator_permit: bool = False
    ip: str = "0.0.0.0"  # what the chain holds for a hotkey that never served an axon
    port: int = 0
    incentive: float = 0.0
    emission: float = 0.0
    consensus: float = 0.0
    last_update: int = 0  # the block of its last weight update
    registered_at: int = 0


class Metagraph:
    def __init__(self, subtensor: Subtensor):
        self.sync(subtensor=subtensor)

    def sync(self, subtensor: Subtensor) -> None:
        neurons = subtensor.neurons
        self.axons = [AxonInfo(version=0, ip=n.ip, port=n.port, ip_type=ip_version(n.ip), hotkey=n.hotkey,
                               coldkey="") for n in neurons]
        self.S = np.array([n.stake for n in neurons], dtype=np.float32)
        self.validator_permit = np.array([n.validator_permit for n in neurons], dtype=bool)
        self.I = np.array([n.incentive for n in neurons], dtype=np.float32)  # noqa: E741 (bittensor's name)
        self.E = np.array([n.emission for n in neurons], dtype=np.float32)
        self.C = np.array([n.consensus for n in neurons], dtype=np.float32)
        self.last_update = np.array([n.last_update for n in neurons], dtype=np.int64)
        self.block = np.array([subtensor.block], dtype=np.int64)
        self.block_at_registration = [n.registered_at for n in neurons]
        self.tempo = subtensor.tempo
        self.hparams = SimpleNamespace(immunity_period=subtensor.immunity_period)

    @property
    def hotkeys(self) -> list[str]:  # as bittensor's: read from the axons
        return [a.hotkey for a in self.axons]


@dataclass
class Subtensor:
    neurons: list[Neuron]
    serve_fails: str | None = None  # the message of a failed serve_axon (a rate limit, say)
    block: int = 1000
    tempo: int = 360
    immunity_period: int = 5000
    networks: list[str] = field(default_factory=list)

    def connect(self, network: str) -> Subtensor:
        """Stands in for bittensor.Subtensor(network=...)."""
        self.networks.append(network)
        return self

    def is_hotkey_registered(self, hotkey_ss58: str, netuid: int) -> bool:
        return netuid == NETUID and any(n.hotkey == hotkey_ss58 for n in self.neurons)

    def metagraph(self, netuid: int) -> Metagraph:
        assert netuid == NETUID
        return Metagraph(self)

    def serve_axon(self, netuid: int, axon) -> ExtrinsicResponse:
        if self.serve_fails:
            return ExtrinsicResponse(False, self.serve_fails)
        neuron = next(n for n in self.neurons if n.hotkey == axon.wallet.hotkey.ss58_address)
        neuron.ip, neuron.port = axon.external_ip, axon.external_port
        return ExtrinsicResponse(True, "served")
