"""The chain in memory, at the one boundary the miner crosses to reach it: the calls it makes on bittensor's
Subtensor (registration, the metagraph, serving its axon) and what it reads of the Metagraph (axons,
stakes, permits). No chain can run here; everything on the miner's side of these objects is real, and
AxonInfo and ExtrinsicResponse are bittensor's own."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from bittensor.core.chain_data import AxonInfo
from bittensor.core.types import ExtrinsicResponse
from bittensor.utils.networking import ip_version

NETUID = 92


@dataclass
class Neuron:
    hotkey: str
    stake: float = 0.0
    validator_permit: bool = False
    ip: str = "0.0.0.0"  # what the chain holds for a hotkey that never served an axon
    port: int = 0


class Metagraph:
    def __init__(self, subtensor: Subtensor):
        self.sync(subtensor=subtensor)

    def sync(self, subtensor: Subtensor) -> None:
        neurons = subtensor.neurons
        self.axons = [AxonInfo(version=0, ip=n.ip, port=n.port, ip_type=ip_version(n.ip), hotkey=n.hotkey,
                               coldkey="") for n in neurons]
        self.S = np.array([n.stake for n in neurons], dtype=np.float32)
        self.validator_permit = np.array([n.validator_permit for n in neurons], dtype=bool)

    @property
    def hotkeys(self) -> list[str]:  # as bittensor's: read from the axons
        return [a.hotkey for a in self.axons]


@dataclass
class Subtensor:
    neurons: list[Neuron]
    serve_fails: str | None = None  # the message of a failed serve_axon (a rate limit, say)
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
