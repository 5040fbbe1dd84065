"""Is the miner earning: its row of the metagraph the miner already syncs (no chain call of its own), and
where it stands among the subnet's miners. Read after each sync, shown by `health --running` and /metrics.

Since dTAO the chain keeps neither trust nor rank: consensus is the nearest to trust, and the rank here is
this hotkey's place by incentive among the uids without a validator permit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BLOCK_S = 12.0  # Bittensor's block time


def _standing(rank: int, miners: int, incentive: float) -> str:
    if incentive <= 0:
        return "earning nothing: validators give it no weight yet"
    share = rank / miners
    for limit, words in ((0.1, "top 10%"), (0.25, "top quarter"), (0.5, "above the median"),
                         (0.75, "below the median")):
        if share <= limit:
            return words
    return "bottom quarter"


def _blocks(n: int) -> str:
    minutes = n * BLOCK_S / 60
    return f"{n:,} blocks (~{minutes:.0f} min)" if minutes < 120 else f"{n:,} blocks (~{minutes / 60:.1f} h)"


@dataclass(frozen=True)
class Earnings:
    uid: int
    block: int
    incentive: float
    consensus: float
    emission: float  # alpha this uid received at its last epoch
    tempo: int | None  # blocks between epochs
    rank: int  # 1 is the highest incentive among the miners
    miners: int
    standing: str
    weights_blocks_ago: int | None  # since the last weight update of any validator
    immunity_left_blocks: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        tempo = f" per tempo ({self.tempo} blocks)" if self.tempo else " per epoch"
        weights = ("no validator has set weights" if self.weights_blocks_ago is None else
                   f"validators last set weights {_blocks(self.weights_blocks_ago)} ago")
        immunity = (f"{_blocks(self.immunity_left_blocks)} left" if self.immunity_left_blocks > 0 else
                    "none left: the lowest-scored uid is deregistered when someone registers")
        return [("uid", f"{self.uid}, metagraph at block {self.block:,}"),
                ("incentive", f"{self.incentive:.6f}: {_ordinal(self.rank)} of {self.miners} miners ({self.standing})"),
                ("emission", f"{self.emission:.6f} α{tempo}"),
                ("consensus", f"{self.consensus:.6f} (the chain keeps no trust since dTAO)"),
                ("weights", weights), ("immunity", immunity)]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _at(values: Any, uid: int) -> float:
    return float(np.asarray(values, dtype=np.float64).reshape(-1)[uid])


def of(metagraph: Any, hotkey: str) -> Earnings | None:
    """This hotkey's earnings from a synced metagraph; None when it holds no uid there."""
    hotkeys = list(metagraph.hotkeys)
    if hotkey not in hotkeys:
        return None
    uid = hotkeys.index(hotkey)
    incentive = np.asarray(metagraph.I, dtype=np.float64).reshape(-1)
    permit = np.asarray(metagraph.validator_permit, dtype=bool).reshape(-1)
    miners = [u for u in range(len(hotkeys)) if not permit[u] or u == uid]
    rank = 1 + sum(1 for u in miners if incentive[u] > incentive[uid])
    block = int(np.asarray(metagraph.block).reshape(-1)[0])
    updates = np.asarray(metagraph.last_update, dtype=np.int64).reshape(-1)
    validators = [int(updates[u]) for u in range(len(hotkeys)) if permit[u] and updates[u] > 0]
    registered = getattr(metagraph, "block_at_registration", None)
    hparams = getattr(metagraph, "hparams", None)
    immunity = getattr(hparams, "immunity_period", None)
    left = (int(immunity) - (block - int(registered[uid]))) if registered is not None and immunity is not None else 0
    tempo = getattr(metagraph, "tempo", None)
    return Earnings(uid=uid, block=block, incentive=float(incentive[uid]), consensus=_at(metagraph.C, uid),
                    emission=_at(metagraph.E, uid), tempo=int(tempo) if tempo else None, rank=rank,
                    miners=len(miners), standing=_standing(rank, len(miners), float(incentive[uid])),
                    weights_blocks_ago=block - max(validators) if validators else None,
                    immunity_left_blocks=max(left, 0))
