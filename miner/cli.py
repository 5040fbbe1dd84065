"""`python -m miner COMMAND`: run, demo, generate, health, fit."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from miner.config import Config, load_config
from miner.errors import ConfigError, StartupError

log = logging.getLogger("miner")

# Chain settings take bittensor's flag names; each maps onto a dotted config key.
CHAIN_FLAGS = ["netuid", "wallet.name", "wallet.hotkey", "wallet.path", "subtensor.network",
               "subtensor.chain_endpoint", "axon.port", "axon.external_ip", "axon.external_port"]
INT_FLAGS = {"netuid", "axon.port", "axon.external_port"}


def _add_config_flags(p: argparse.ArgumentParser, chain: bool = False) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see config.example.yaml); default: built-in defaults")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="overrides log_level in the config (default INFO)")
    if chain:
        for flag in CHAIN_FLAGS:
            p.add_argument(f"--{flag}", dest=flag, type=int if flag in INT_FLAGS else str, metavar="VALUE",
                           help=f"overrides {flag} in the config")


def _load(args: argparse.Namespace) -> Config:
    overrides = {flag: getattr(args, flag, None) for flag in CHAIN_FLAGS}
    config = load_config(args.config, overrides)
    if args.log_level is None:  # the flag, when given, was applied in main()
        logging.getLogger().setLevel(config.log_level)
    return config


def _build_service(config: Config):
    from backends.chain import Chain
    from miner.service import StoryService
    return StoryService(Chain.from_config(config.backends, config.chain), config.generation)


def cmd_run(args: argparse.Namespace) -> int:
    source = str(args.config) if args.config else "the built-in defaults (no --config)"
    return serve(_load(args), args.offline, source)


def serve(config: Config, offline: bool, source: str, connect: Callable[..., Any] | None = None,
          build_service: Callable[[Config], Any] = _build_service) -> int:
    """Check everything that can fail at start (miner/startup.py) before the model loads, then serve until
    SIGINT/SIGTERM. connect (the chain) and build_service are what tests replace."""
    from miner import startup
    from miner.neuron import Miner
    config, wallet, subtensor = startup.check(config, offline, source, connect)
    miner = Miner(config, build_service(config), wallet, offline=offline, subtensor=subtensor)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: miner.stop())
    try:
        miner.start()
        miner.run_until_stopped()
    finally:
        miner.close()
    log.info("stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from miner.demo import run_demo
    return run_demo(_load(args), args.input)


def cmd_generate(args: argparse.Namespace) -> int:
    from miner import examples
    fields: dict[str, Any] = examples.example_fields(args.task, args.input)
    if args.context:
        try:
            context = json.loads(args.context.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{args.context}: cannot read the context JSON ({e})") from None
        if not isinstance(context, dict):
            raise ConfigError(f"{args.context}: must hold a JSON object with blueprint/characters/story_arc/chapter_ids")
        fields.update({k: v for k, v in context.items() if k in ("blueprint", "characters", "story_arc", "chapter_ids")})
    service = _build_service(_load(args))
    try:
        answer = service.answer(fields)
    finally:
        service.chain.close()
    json.dump(answer.output, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0 if answer.ok else 1


# Commands whose own module parses the rest of the line.
DELEGATED = {"health": "miner.health:main", "fit": "models.fit:main"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve validators until SIGINT/SIGTERM")
    run.add_argument("--offline", action="store_true", help="loopback only, no chain, allowlisted hotkeys")
    _add_config_flags(run, chain=True)
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="answer all four tasks through a real Axon and Dendrite on 127.0.0.1")
    demo.add_argument("--input", default=None, help="story request (default: an English one, for the demo model)")
    _add_config_flags(demo)
    demo.set_defaults(func=cmd_demo)
    gen = sub.add_parser("generate", help="print one task's output_data JSON")
    gen.add_argument("--task", required=True, choices=["blueprint", "characters", "story_arc", "chapters"])
    gen.add_argument("--input", required=True, help="the story request")
    gen.add_argument("--context", type=Path, help="JSON with blueprint, characters (a list, as in protocol 3.2.1, "
                     "or 3.2.0's {\"characters\": [...]}), story_arc, chapter_ids; default: the built-in example")
    _add_config_flags(gen)
    gen.set_defaults(func=cmd_generate)
    sub.add_parser("health", help="check config, backends and a running miner (health --help)")
    sub.add_parser("fit", help="plan GPU offload for a model and a VRAM budget (fit --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left early (`fit | head`): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 1
    return code


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        module_name, fn = DELEGATED[argv[0]].split(":")
        return getattr(import_module(module_name), fn)(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level or "INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from backends.base import BackendError
    try:
        return args.func(args)
    except (ConfigError, StartupError, BackendError) as e:
        log.error("%s", e)
        return 2
