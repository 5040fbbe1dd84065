"""What Miner.blacklist and Miner.priority cost per call in chain mode, for each kind of caller.

The Axon awaits both for every request before it reads the body, so each refused request costs this
much of the miner's event loop (plus the HTTP exchange). The metagraph is built in memory with 256
hotkeys, as a full subnet has; no chain is touched.

    .venv/bin/python scripts/blacklist_cost.py [--calls 100000]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np


import bittensor as bt
from bittensor_wallet import Keypair

from backends.chain import BackendState, Chain
from miner.config import BlacklistSettings, Config
from miner.demo import make_wallet
from miner.neuron import Miner
from miner.protocol import StoryGenerationSynapse
from miner.service import StoryService

UIDS = 256
BIG_VALIDATORS = range(64)  # 1000 TAO and a permit
SMALL_VALIDATORS = range(64, 72)  # a permit but 2 TAO: below min_stake
# the rest: miners, 5 TAO, no permit


@dataclass
class Metagraph:
    """The fields CallerTable reads of bittensor's metagraph."""
    hotkeys: list[str]
    S: np.ndarray
    validator_permit: np.ndarray


def key(name: str) -> str:
    return Keypair.create_from_uri(f"//blacklist-cost-{name}").ss58_address


def metagraph() -> Metagraph:
    stakes = [1000.0 if uid in BIG_VALIDATORS else 2.0 if uid in SMALL_VALIDATORS else 5.0 for uid in range(UIDS)]
    return Metagraph([key(str(uid)) for uid in range(UIDS)], np.array(stakes, dtype=np.float32),
                     np.array([uid < SMALL_VALIDATORS.stop for uid in range(UIDS)], dtype=bool))


async def seconds_per_call(fn, synapse: StoryGenerationSynapse, calls: int) -> float:
    """Awaited one after another, as the Axon awaits them."""
    start = time.perf_counter()
    for _ in range(calls):
        await fn(synapse)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls timed per kind of caller")
    args = parser.parse_args(argv)
    graph = metagraph()
    rules = BlacklistSettings(require_validator_permit=True, min_stake=10.0, force_allow=[key("operator")])
    callers = {"registered validator": graph.hotkeys[BIG_VALIDATORS[10]], "in force_allow": key("operator"),
               "unregistered": key("stranger"), "no validator permit": graph.hotkeys[200],
               "stake below min_stake": graph.hotkeys[SMALL_VALIDATORS[0]], "no hotkey": None}
    chain = Chain([BackendState(None, "unused", build_error="timing the blacklist generates nothing")])
    with tempfile.TemporaryDirectory() as wallets:  # the miner's own wallet plays no part in the blacklist
        miner = Miner(Config(blacklist=rules), StoryService(chain, Config().generation),
                      make_wallet(wallets, "blacklist-cost"), offline=False)
    miner.callers.update(graph)
    print(f"{UIDS} hotkeys in the metagraph, {args.calls} calls each, Python {sys.version.split()[0]}")
    try:
        for kind, hotkey in callers.items():
            synapse = StoryGenerationSynapse(dendrite=bt.TerminalInfo(hotkey=hotkey))
            refused, why = asyncio.run(miner.blacklist(synapse))
            cost = asyncio.run(seconds_per_call(miner.blacklist, synapse, args.calls))
            print(f"blacklist  {kind:22s} {cost * 1e6:6.2f} µs/call  {'refused' if refused else 'allowed'}: {why}")
        synapse = StoryGenerationSynapse(dendrite=bt.TerminalInfo(hotkey=callers["registered validator"]))
        cost = asyncio.run(seconds_per_call(miner.priority, synapse, args.calls))
        print(f"priority   {'registered validator':22s} {cost * 1e6:6.2f} µs/call  "
              f"{asyncio.run(miner.priority(synapse)):g}")
    finally:
        miner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
