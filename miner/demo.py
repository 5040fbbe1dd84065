"""`python -m miner demo`: the whole path a validator's request takes, on 127.0.0.1.

A miner starts offline with the configured (or embedded) model; a real Dendrite signed by a throwaway
wallet sends the four tasks in the order a story is built, each answer becoming the next one's
context, and every answer is held against the contract and read back as a 3.2.1 validator rebuilds it and
forwards it for scoring (miner/forwarded.py). Exit 0 only if all four meet the contract and arrive whole.
"""
from __future__ import annotations

import json
import logging
import socket
import sys
import tempfile
import time
from typing import Any

import bittensor as bt
from bittensor_wallet import Wallet

from miner import examples
from miner.config import Config
from miner.contract import VALIDATOR_TIMEOUT_S, answer_of, error_of
from miner.neuron import Miner, no_public_ip_lookup
from miner.forwarded import StoryGenerationSynapse, forward
from miner.service import StoryService
from miner.tasks import TASKS, ContractError, Context

log = logging.getLogger(__name__)


def make_wallet(path: str, name: str) -> Wallet:
    wallet = Wallet(name=name, hotkey="default", path=path)
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_offline_miner(config: Config, service, wallet_dir: str, allowed: list[str]) -> Miner:
    """A miner on a free loopback port that answers only the allowed hotkeys."""
    config = config.model_copy(update={
        "offline": config.offline.model_copy(update={"allowed_hotkeys": allowed}),
        "axon": config.axon.model_copy(update={"port": free_port()}),
        "health": config.health.model_copy(update={"port": 0})})  # never collide with a running miner
    miner = Miner(config, service, make_wallet(wallet_dir, "demo-miner"), offline=True)
    miner.start()
    return miner


def _contract_check(task: str, answer: Any, ctx: Context) -> str | None:
    if not isinstance(answer, dict):
        return f"no JSON object came back ({type(answer).__name__})"
    if error := error_of(answer):
        return f"{error[1]} ({error[0]})"
    try:
        TASKS[task].check(answer_of(answer), ctx)
    except ContractError as e:
        return str(e)
    sent = forward(answer, task)
    return "; ".join(sent.problems) if sent.problems else None


def run_demo(config: Config, user_input: str | None = None) -> int:
    from backends.chain import Chain

    service = StoryService(Chain.from_config(config.backends, config.chain), config.generation)
    context: dict[str, Any] = {"user_input": user_input or examples.USER_INPUT, "chapter_ids": examples.CHAPTER_IDS}
    fallback = examples.example_fields("chapters")
    failures = 0
    with tempfile.TemporaryDirectory() as wallets, no_public_ip_lookup():
        validator = make_wallet(wallets, "demo-validator")
        miner = start_offline_miner(config, service, wallets, [validator.hotkey.ss58_address])
        dendrite = bt.Dendrite(wallet=validator)
        try:
            for task in TASKS:
                fields = {"task_type": task, "user_input": context["user_input"],
                          **{k: context.get(k) or fallback[k] for k in TASKS[task].needs}}
                synapse = StoryGenerationSynapse(**fields)  # the 3.2.1 validators' own class
                started = time.monotonic()
                answer = dendrite.query(axons=[miner.axon.info()], synapse=synapse,
                                        timeout=VALIDATOR_TIMEOUT_S, deserialize=True)[0]
                seconds = time.monotonic() - started
                problem = _contract_check(task, answer, service.prepare(fields)[1])
                failures += problem is not None
                model = (answer or {}).get("model_info", {}).get("name", "?") if isinstance(answer, dict) else "?"
                sent = forward(answer, task).task_type
                print(f"== {task}: {'meets the contract' if problem is None else 'FAILED: ' + problem} "
                      f"in {seconds:.1f} s ({model}); a 3.2.1 validator forwards it for scoring as "
                      + ("an answer that breaks its step" if sent is None else f"task_type {sent!r}"))
                print(json.dumps(answer, ensure_ascii=False, indent=2))
                sys.stdout.flush()
                if problem is None and task != "chapters":
                    answer = answer_of(answer)
                    # what the next request carries: 3.2.1 sends the cast as a bare list
                    context[task] = answer["characters"] if task == "characters" else answer
        finally:
            miner.close()
    print(f"== {len(TASKS) - failures} of {len(TASKS)} tasks met the contract")
    return 0 if failures == 0 else 1
