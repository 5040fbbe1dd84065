"""Can validators reach this miner? The axon the chain advertises for its hotkey against the one it
serves, and the time since a validator last asked.

Pure functions over plain values (the caller reads the metagraph and the clocks), so each case is tested
against an in-memory metagraph (tests/test_reachability.py). Each check gives a Finding: ok True (fine),
False (validators are not reaching this miner, or soon will not), None (too early to say).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, NamedTuple

# 3.2.1 validators query every served axon about every 75 s: ten silent minutes are not bad luck.
QUIET_AFTER_S = 600.0
CGNAT = ipaddress.ip_network("100.64.0.0/10")


class Finding(NamedTuple):
    ok: bool | None
    detail: str


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def advertised(metagraph: Any, hotkey: str) -> Endpoint | None:
    """The axon the chain advertises for this hotkey; None when the hotkey is not in the metagraph."""
    return next((Endpoint(str(a.ip), int(a.port)) for a in metagraph.axons if a.hotkey == hotkey), None)


def address_problem(ip: str) -> str | None:
    """Why validators on the internet cannot reach this address; None for a public one."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    if address.is_unspecified:
        return f"{ip} means no axon at all, so validators skip this miner: set axon.external_ip to the public IP"
    if address.is_loopback:
        return f"{ip} is a loopback address: only this machine can reach it"
    if address.version == 4 and address in CGNAT:
        return (f"{ip} is a carrier-grade NAT address: the ISP shares one public IP among customers, so no port "
                "can be forwarded to this machine; ask the ISP for a public IP, or mine from a server that has one")
    if address.is_private:
        return (f"{ip} is a private (LAN) address that validators on the internet cannot reach: set axon.external_ip "
                "to this network's public IP (`curl -4 ifconfig.me`)")
    if not address.is_global:
        return f"{ip} is not a public internet address"
    return None


def chain_finding(on_chain: Endpoint | None, served: Endpoint, listening_port: int) -> Finding:
    """The chain's entry for this hotkey against what the miner serves (axon.external_ip and external_port)."""
    if on_chain is None:
        return Finding(False, "this hotkey is no longer in the subnet's metagraph: it was deregistered; "
                              "register it again (README, \"Mining on subnet 92\") and restart the miner")
    if _unspecified(on_chain.ip) and not _unspecified(served.ip):
        return Finding(False, f"the chain advertises {on_chain}, no axon: serving it on chain failed or has not "
                              "reached the chain yet (see the start-up log)")
    problems = []
    if on_chain != served:
        what = "address" if on_chain.ip != served.ip else "port"
        problems.append(f"the chain advertises {on_chain}, this miner serves {served}, so validators go to another "
                        f"{what}: serving it on chain failed (see the start-up log), or another miner with this "
                        "hotkey served its own")
    problem = address_problem(on_chain.ip)
    if problem:
        problems.append(problem)
    if problems:
        return Finding(False, "; ".join(problems))
    forwarded = "" if served.port == listening_port else (
        f"; the router must forward port {served.port} to this machine's port {listening_port}")
    return Finding(True, f"the chain advertises {on_chain}, what this miner serves{forwarded}")


def requests_finding(now: float, served_at: float, last_request: float | None, refused: int,
                     last_refusal: str | None, served: Endpoint, quiet_after_s: float = QUIET_AFTER_S) -> Finding:
    """Whether validators' requests arrive. Times are one monotonic clock's seconds; last_request is the
    last request from a registered hotkey, refused counts requests the blacklist turned away."""
    if last_request is not None and now - last_request < quiet_after_s:
        return Finding(True, f"last validator request {_span(now - last_request)} ago")
    silent = now - (served_at if last_request is None else last_request)
    since = "since the axon was served" if last_request is None else "since the last one"
    if silent < quiet_after_s:
        return Finding(None, f"no validator request yet, {_span(silent)} {since}; judged after {_span(quiet_after_s)}")
    if refused:
        causes = (f"{refused} requests reached the axon but were refused (last: {last_refusal}): if validators are "
                  "among them, loosen blacklist.min_stake or blacklist.require_validator_permit")
    else:
        causes = (f"nothing reached the axon: port {served.port} is closed or not forwarded to this machine (try "
                  f"`nc -vz {served.ip} {served.port}` from another network), the chain advertises another address "
                  "(see the chain row), or the subnet's validators are not running")
    return Finding(False, f"no validator request in the {_span(silent)} {since}; likely causes: {causes}")


def _unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min"
