"""The miner's one front door: `storynet-miner COMMAND` (or `python -m miner COMMAND`).

Every command an operator runs is a subcommand here, with its flags and the one exit-code table below. A
command's module says its flags (`arguments(parser)`) and does the work (`command(args) -> int`); it is
imported only when that command runs, so `health` does not load bittensor and `--help` is quick.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from miner.config import Config, load_config
from miner.errors import ConfigError, MinerError

log = logging.getLogger("miner")

PROG = "storynet-miner"
EXIT_CODES = """exit codes (every command):
  0    done (health: healthy, the first backend in the YAML serves)
  1    done, but not good: an answer broke the contract (generate, demo); health: degraded (only a fallback
       serves, or validators cannot reach the miner: alert, do not restart)
  2    could not do it: a flag, the config, a file, a model, a key, the chain or the start; the message says
       what to fix (health: down, no backend can serve or no running miner answered: restart)
  130  interrupted (Ctrl-C); a download resumes when run again"""


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # holds arguments(parser) and command(args), or the names below
    arguments: str = "arguments"
    command: str = "command"


COMMANDS = {
    "run": Command("serve validators until SIGINT/SIGTERM", "miner.cli", "run_arguments", "cmd_run"),
    "demo": Command("answer all four tasks through a real Axon and Dendrite on 127.0.0.1", "miner.cli",
                    "demo_arguments", "cmd_demo"),
    "generate": Command("print a task's output_data JSON (--repeat: one per line)", "miner.cli",
                        "generate_arguments", "cmd_generate"),
    "health": Command("check config, backends and a running miner", "miner.health"),
    "fit": Command("plan GPU offload for a model and a VRAM budget, and time each task's answer here",
                   "miner.verdict"),
    "download": Command("download a catalog model's Q4 GGUF file(s)", "miner.cli", "download_arguments",
                        "cmd_download"),
    "convert": Command("convert a Hugging Face checkpoint to a Q4 GGUF file", "models.hf_to_gguf"),
    "score": Command("score answers by the subnet's public rules, per part and in total", "miner.score"),
    "bench": Command("the miner's speed against raw llama.cpp on the same model", "miner.bench"),
    "loadtest": Command("replay the subnet's validators against a miner", "miner.loadtest"),
}

# Chain settings take bittensor's flag names; each maps onto a dotted config key.
CHAIN_FLAGS = ["netuid", "wallet.name", "wallet.hotkey", "wallet.path", "subtensor.network",
               "subtensor.chain_endpoint", "axon.port", "axon.external_ip", "axon.external_port"]
INT_FLAGS = {"netuid", "axon.port", "axon.external_port"}


def _add_config_flags(p: argparse.ArgumentParser, chain: bool = False) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see config.example.yaml); default: built-in defaults")
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
    if args.repeat < 1:
        raise ConfigError(f"generate: --repeat must be 1 or more, got {args.repeat}")
    if args.as_validator:  # the 3.2.1 validators' request: their mock context, their prompts in turn
        requests = [examples.validator_fields(args.task, args.input or examples.VALIDATOR_PROMPTS[n % 8])
                    for n in range(args.repeat)]
    else:
        if not args.input:
            raise ConfigError("generate: --input is needed (or --as-validator, for the validators' requests)")
        fields: dict[str, Any] = examples.example_fields(args.task, args.input)
        if args.context:
            try:
                context = json.loads(args.context.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{args.context}: cannot read the context JSON ({e})") from None
            if not isinstance(context, dict):
                raise ConfigError(f"{args.context}: must hold a JSON object with blueprint/characters/story_arc/"
                                  f"chapter_ids")
            fields.update({k: v for k, v in context.items()
                           if k in ("blueprint", "characters", "story_arc", "chapter_ids")})
        requests = [fields] * args.repeat
    service = _build_service(_load(args))
    ok = True
    try:
        for fields in requests:
            answer = service.answer(fields)
            ok = ok and answer.ok
            # one answer: indented; several: one per line (JSON lines, what `score` reads)
            json.dump(answer.output, sys.stdout, ensure_ascii=False, indent=2 if args.repeat == 1 else None)
            sys.stdout.write("\n")
            sys.stdout.flush()
    finally:
        service.chain.close()
    return 0 if ok else 1


def cmd_download(args: argparse.Namespace) -> int:
    from models import download
    return download.command(args, load_config(args.config).models_dir if args.name and not args.dir else None)


def download_arguments(p: argparse.ArgumentParser) -> None:
    from models import download
    download.arguments(p)
    p.add_argument("--config", type=Path, help="the miner's YAML, for its models_dir")


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offline", action="store_true", help="loopback only, no chain, allowlisted hotkeys")
    _add_config_flags(p, chain=True)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default=None, help="story request (default: an English one, for the demo model)")
    _add_config_flags(p)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=["blueprint", "characters", "story_arc", "chapters"])
    p.add_argument("--input", help="the story request (with --as-validator: default, theirs in turn)")
    p.add_argument("--context", type=Path, help="JSON with blueprint, characters (a list, as in protocol 3.2.1, "
                   "or 3.2.0's {\"characters\": [...]}), story_arc, chapter_ids; default: the built-in example")
    p.add_argument("--as-validator", action="store_true",
                   help="the 3.2.1 validators' request: their mock context and their Chinese prompts in turn")
    p.add_argument("--repeat", type=int, default=1, help="answers to write, one JSON per line (default 1)")
    _add_config_flags(p)


def _entry(command: Command, name: str) -> Callable[..., Any]:
    return getattr(import_module(command.module), name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help line; `command`'s own flags too (its module is imported for them)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help, epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="what is logged to stderr (run, demo, generate: overrides log_level in the config)")
        if name == command:
            _entry(entry, entry.arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _dispatch(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left early (`fit | head`): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


def _dispatch(argv: list[str]) -> int:
    named = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(named if named in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=args.log_level or "INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    entry = COMMANDS[args.command]
    try:
        return _entry(entry, entry.command)(args)
    except MinerError as e:  # a refusal with its fix; anything else is a bug and keeps its traceback
        log.error("%s", e)
        return 2
