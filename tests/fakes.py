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

# Answers that meet the contract, as an API backend would return them.
BLUEPRINT = {
    "title": "The Tide Clock", "genre": "mystery",
    "setting": "A harbour town where the tide clock in the square has stopped and the boats no longer return.",
    "core_conflict": "A young clockmaker must restart the clock before the last fleet is lost at sea.",
    "themes": ["time", "duty"], "tone": "brooding", "target_audience": "young adult readers"}


CHAPTER = {
    "id": 1, "title": "The Signal at Dawn",
    "content": "\n\n".join([
        "The relay station had been silent for eleven years, so when its beacon blinked green at dawn, Lin Yao "
        "dropped her coffee. The mug rolled across the deck plates and came to rest against Okoro's boot. He "
        "looked down at it, then up at her, and neither of them said a word for a long moment.",
        "\"It could be a fault,\" Okoro said at last. \"Old hardware wakes up for no reason. Cold cycles, a "
        "loose relay, a micrometeorite.\" But his voice lacked conviction, and his hands had already found the "
        "console. The signal repeated every nine seconds, a pattern too regular for chance and too strange for "
        "any protocol either of them knew.",
        "Captain Venn arrived within minutes, her jacket half buttoned, her eyes hard. She listened to the pulse "
        "twice before she spoke. \"We log it and we move on. The convoy has a schedule, and dead stations do not "
        "send invitations.\" Lin felt the old argument rise in her throat: the missing crews, the unanswered "
        "calls, the year the relays went dark one after another.",
        "In the end it was Teodor, the retired keeper who rarely left his cabin, who settled nothing and changed "
        "everything. He shuffled onto the bridge, listened once, and smiled. \"That is my handshake,\" he said. "
        "\"Someone out there still remembers it.\""]),
    "choices": [
        {"id": "A", "text": "Follow the signal to the station",
         "consequences": {"outcome": "The convoy turns toward the relay, and the captain never forgives the delay."}},
        {"id": "B", "text": "Obey the captain and hold course",
         "consequences": {"outcome": "The beacon fades behind them, and Teodor locks himself in his cabin."}}],
}


class FakeBackend(Backend):
    """Answers from a queue: a string is the text, an exception is raised. Records each request."""
    type = "custom"
    mode = "custom"

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
