"""The neuron: an Axon serving StoryGenerationSynapse with forward, blacklist and priority.

Chain mode serves the axon on chain, resyncs the metagraph, and checks that validators can reach it
(miner/reachability.py); miner/startup.py has checked the wallet, the chain and the registration before.
Offline mode listens on 127.0.0.1 only, touches no chain, and answers only allowlisted hotkeys.
Identity comes only from `synapse.dendrite.hotkey`.
No `from __future__ import annotations` here: Axon.attach() inspects the real annotation objects.
"""

import asyncio
import contextlib
import functools
import json
import logging
import math
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import bittensor as bt
from bittensor_wallet import Wallet

from miner import __version__, earnings, reachability, verdict
from miner.activity import Activity
from miner.config import Config
from miner.errors import StartupError
from miner.health import Check
from miner.health_monitor import HealthMonitor
from miner.metrics import Metrics
from miner.protocol import StoryGenerationSynapse
from miner.reachability import Endpoint
from miner.refusals import RefusalWatch
from miner.contract import VALIDATOR_TIMEOUT_S, error_of, unknown_model_info
from miner.service import Answer, StoryService, clean_text, failed_answer
from miner.tasks import TASKS

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
AXON_START_TIMEOUT_S = 10.0
# Requests beyond what the backends decode together wait in their queues, where one that cannot be served
# in time is refused at once; these threads only wait on them.
FORWARD_THREADS = 32
CLOSE_WAIT_S = 10.0  # after the grace: for failed answers to reach their callers
SHUTTING_DOWN = "the miner is shutting down; ask again after it restarts"


@contextlib.contextmanager
def no_public_ip_lookup() -> Iterator[None]:
    """bittensor asks a web service for the public IP when an Axon or Dendrite is built; offline
    (loopback, no internet) that lookup fails, so it answers loopback instead."""
    from bittensor.utils import networking
    original = networking.get_external_ip
    networking.get_external_ip = lambda: LOOPBACK
    try:
        yield
    finally:
        networking.get_external_ip = original


def _encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return True


@dataclass(frozen=True)
class Caller:
    uid: int
    stake: float
    validator_permit: bool


class CallerTable:
    """hotkey -> caller facts, rebuilt whole on each metagraph sync and swapped in at once."""

    def __init__(self) -> None:
        self._by_hotkey: dict[str, Caller] = {}

    def update(self, metagraph) -> None:
        stakes = [float(s) for s in metagraph.S]
        self._by_hotkey = {
            hotkey: Caller(uid, stakes[uid], bool(metagraph.validator_permit[uid]))
            for uid, hotkey in enumerate(metagraph.hotkeys)}

    def get(self, hotkey: str) -> Caller | None:
        return self._by_hotkey.get(hotkey)


class Miner:
    def __init__(self, config: Config, service: StoryService, wallet: Wallet, *, offline: bool, subtensor=None):
        """subtensor: chain mode's connection, checked by miner/startup.py (an in-memory one in tests)."""
        self.config = config
        self.service = service
        self.wallet = wallet
        self.offline = offline
        self.allowed = set(config.offline.allowed_hotkeys)
        self.force_allowed = frozenset(config.blacklist.force_allow)
        self.callers = CallerTable()
        self.subtensor = subtensor
        self.metagraph = None
        self.earnings: earnings.Earnings | None = None  # this hotkey's row, as of the last sync
        self.metrics = Metrics(service.chain, lambda: self.earnings)
        self.activity = Activity(lambda hotkey: not self._judge(hotkey)[0], self.metrics)
        self._advertised: Endpoint | None = None  # this hotkey's axon on chain, as of the last sync
        self._served_at = 0.0
        self._last_request: float | None = None  # from a registered hotkey: a validator
        self._refused = 0
        self._last_refusal: str | None = None
        self.axon: bt.Axon | None = None
        self._executor = ThreadPoolExecutor(max_workers=FORWARD_THREADS, thread_name_prefix="forward")
        self._stop = threading.Event()
        self._closing = False
        self._in_flight = 0
        self._idle = threading.Condition()
        self.health: HealthMonitor | None = None

    # --- the three functions the Axon calls -------------------------------------------------------
    async def forward(self, synapse: StoryGenerationSynapse) -> StoryGenerationSynapse:
        arrived = time.monotonic()  # the clock runs while the request waits for a worker thread too
        fields = {name: getattr(synapse, name) for name in
                  ("task_type", "user_input", "blueprint", "characters", "story_arc", "chapter_ids")}
        caller = synapse.dendrite.hotkey if synapse.dendrite else None
        known = self.callers.get(caller) if caller else None
        if known is not None:
            self._last_request = arrived
        cancelled = threading.Event()
        with self._idle:
            self._in_flight += 1
        try:
            if self._closing:
                answer = failed_answer("busy", SHUTTING_DOWN, fields["task_type"], arrived)
            else:
                answer = await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(
                    self.service.answer, fields, synapse.timeout, known.stake if known else 0.0, arrived,
                    cancelled=cancelled))
        except asyncio.CancelledError:  # the request was dropped: the backend frees its slot at its next step
            cancelled.set()
            raise
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        for name, value in fields.items():  # the response echoes the inputs: they must encode as UTF-8 JSON
            if not _encodable(value):
                setattr(synapse, name, clean_text(value) if isinstance(value, str) else None)
        # NaN or infinity, refused in the answer, would be echoed as is, and JSON has no such numbers: the
        # Axon would answer HTTP 500. None would break the caller reading the timeout header back.
        if synapse.timeout is not None and not math.isfinite(synapse.timeout):
            synapse.timeout = VALIDATOR_TIMEOUT_S
        synapse.output_data = answer.output
        synapse.generation_time = round(answer.seconds, 3)
        synapse.miner_version = __version__
        synapse.model_info = answer.model_info or unknown_model_info()
        task = fields["task_type"] if isinstance(fields["task_type"], str) and fields["task_type"] in TASKS else "?"
        log.info("%s for %s: %s in %.2f s", task, caller,  # never a caller's raw text in a log line
                 "ok" if answer.ok else answer.output["error"], answer.seconds)
        self._record(task, answer, synapse.protocol_version, caller)
        return synapse

    def _record(self, task: str, answer: Answer, version: object, caller: str | None) -> None:
        error = error_of(answer.output)
        outcome = "valid" if error is None else "busy" if error[0] == "busy" else "error"
        generation = answer.generation
        self.activity.answered(task, outcome, generation.backend if generation else "none", answer.seconds,
                               generation.completion_tokens if generation else 0, version, caller)
        if error is not None and error[0] == "input":
            self.activity.refused("unknown task_type" if task == "?" else "fields out of contract", error[1], caller)

    async def blacklist(self, synapse: StoryGenerationSynapse) -> typing.Tuple[bool, str]:
        refused, why = self._judge(synapse.dendrite.hotkey if synapse.dendrite else None)
        if refused:
            self._refused += 1
            self._last_refusal = why
        return refused, why

    def _judge(self, hotkey: str | None) -> tuple[bool, str]:
        if not hotkey:
            return True, "request carries no hotkey"
        if self.offline:
            return (False, "allowlisted") if hotkey in self.allowed else (True, "hotkey not in offline.allowed_hotkeys")
        if hotkey in self.force_allowed:
            return False, "in blacklist.force_allow"
        caller = self.callers.get(hotkey)
        rules = self.config.blacklist
        if caller is None:
            return (True, "hotkey not registered") if rules.require_registered else (False, "unregistered allowed")
        if rules.require_validator_permit and not caller.validator_permit:
            return True, "caller has no validator permit"
        if caller.stake < rules.min_stake:
            return True, f"caller stake {caller.stake:.1f} below blacklist.min_stake"
        return False, "registered caller"

    async def priority(self, synapse: StoryGenerationSynapse) -> float:
        caller = self.callers.get(synapse.dendrite.hotkey) if synapse.dendrite else None
        return caller.stake if caller else 0.0

    # --- lifecycle ---------------------------------------------------------------------------------
    def _serve_on_chain(self, axon: bt.Axon) -> None:
        """Advertise the axon for this hotkey, then read back what the chain now says."""
        served = self.subtensor.serve_axon(netuid=self.config.netuid, axon=axon)
        if not served.success:  # validators find the old entry or none: the reachability check says which
            log.warning("serving the axon on chain failed: %s", served.message)
        try:
            self.resync()
        except Exception as e:  # a flaky chain endpoint: the next resync reads it back
            log.warning("reading the axon back from the chain failed: %s", e)

    def start(self) -> bt.Axon:
        a = self.config.axon
        if self.offline:
            with no_public_ip_lookup():
                axon = bt.Axon(wallet=self.wallet, port=a.port, ip=LOOPBACK, external_ip=LOOPBACK)
            axon.fast_server.config.host = LOOPBACK  # Axon binds 0.0.0.0 whatever ip= says
        else:
            self.metagraph = self.subtensor.metagraph(self.config.netuid)
            self._read_metagraph()
            axon = bt.Axon(wallet=self.wallet, port=a.port, ip=a.ip, external_ip=a.external_ip,
                           external_port=a.external_port)
            axon.fast_server.config.host = a.ip
        axon.attach(forward_fn=self.forward, blacklist_fn=self.blacklist, priority_fn=self.priority)
        axon.app.add_middleware(RefusalWatch, activity=self.activity)
        axon.start()
        self.axon = axon
        self._wait_listening(axon)
        if not self.offline:
            self._serve_on_chain(axon)
        self._served_at = time.monotonic()
        self.health = HealthMonitor(self.config, self.service.chain, (axon.fast_server.config.host, a.port),
                                    checks=self.checks, sections=self.sections, metrics=self.metrics.render)
        self.health.start()
        log.info("axon serving StoryGenerationSynapse on %s:%d (%s)", axon.fast_server.config.host, a.port,
                 "offline, allowlist only" if self.offline else f"netuid {self.config.netuid}")
        if (report := verdict.start_report(self.service.chain.backends, self.service.settings)) is not None:
            text, too_slow = report
            log.log(logging.WARNING if too_slow else logging.INFO, "%s", text)
        return axon

    @staticmethod
    def _wait_listening(axon: bt.Axon) -> None:
        """Axon.start() returns before uvicorn listens; a port already taken never gets there."""
        deadline = time.monotonic() + AXON_START_TIMEOUT_S
        while not axon.fast_server.started:
            if time.monotonic() > deadline:
                raise StartupError(f"the axon did not start listening on {axon.fast_server.config.host}:"
                                   f"{axon.port} within {AXON_START_TIMEOUT_S:.0f} s; is the port in use? "
                                   f"Pick another with --axon.port")
            time.sleep(0.01)

    def resync(self) -> None:
        if self.metagraph is not None:
            self.metagraph.sync(subtensor=self.subtensor)
            self._read_metagraph()

    def _read_metagraph(self) -> None:
        self.callers.update(self.metagraph)
        hotkey = self.wallet.hotkey.ss58_address
        self._advertised = reachability.advertised(self.metagraph, hotkey)
        self.earnings = earnings.of(self.metagraph, hotkey)

    def checks(self) -> tuple[Check, ...]:
        """The protocol validators send and their refused requests; chain mode adds reachability."""
        answer_time = verdict.check(self.service.chain.backends, self.service.settings)
        return (self.activity.checks() + ((answer_time,) if answer_time else ())
                + (() if self.offline else self.reach_checks()))

    def sections(self) -> dict[str, object]:
        return {"earnings": self.earnings.to_json() if self.earnings else None, "recent": self.activity.recent()}

    def reach_checks(self) -> tuple[Check, ...]:
        """Chain mode: the chain's entry for this axon, and whether validators' requests arrive."""
        served = Endpoint(self.axon.external_ip, self.axon.external_port)
        chain = reachability.chain_finding(self._advertised, served, self.axon.port)
        requests = reachability.requests_finding(time.monotonic(), self._served_at, self._last_request,
                                                 self._refused, self._last_refusal, served)
        return Check("chain", *chain), Check("requests", *requests)

    def run_until_stopped(self) -> None:
        """Serve until stop() (SIGINT/SIGTERM); chain mode resyncs the metagraph on the way."""
        while not self._stop.wait(self.config.resync_s):
            try:
                self.resync()
            except Exception as e:  # a flaky chain endpoint must not stop serving
                log.warning("metagraph resync failed, keeping the last one: %s", e)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop accepting requests, give those in flight shutdown_grace_s to finish, fail the rest with an
        explicit error, then unload the backends."""
        self._closing = True
        if self.health is not None:
            self.health.stop()
        if self.axon is not None:
            self.axon.stop()  # uvicorn closes its socket; requests in flight keep their connections
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=self.config.shutdown_grace_s):
                log.warning("%d requests still in flight after shutdown_grace_s (%.0f s): failing them",
                            self._in_flight, self.config.shutdown_grace_s)
        self.service.chain.close()  # a backend fails what it still holds: each caller gets an explicit error
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=CLOSE_WAIT_S)
        if self.axon is not None:
            self._wait_sent(self.axon)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _wait_sent(axon: bt.Axon) -> None:
        """The server thread is a daemon: leaving before uvicorn has written the last answers would drop them."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while axon.fast_server.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.05)
