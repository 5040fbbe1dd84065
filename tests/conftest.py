"""Shared fixtures: the embedded model in llama.cpp, throwaway wallets, a loopback-only bittensor, a
chain-mode miner on the in-memory chain."""
from __future__ import annotations

import dataclasses
import sys
import textwrap

import miner  # noqa: F401  (first: it loads llama_cpp before numpy and torch)

from typing import Any

import pytest

from backends.custom_command import CustomSettings
from backends.llama_cpp import LlamaCppSettings
from miner import examples


@pytest.fixture(scope="session")
def embedded_backend():
    """The embedded demo model, loaded once for the whole run (a real llama.cpp model, 98 MB)."""
    from backends.llama_cpp import LlamaCppBackend
    # A seed: the same answers run after run (what a 135M model writes decides whether some tests pass).
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="local", n_ctx=8192, seed=1))
    yield backend
    backend.close()


@pytest.fixture
def writer(tmp_path) -> CustomSettings:
    """A custom command that writes the example blueprint, meeting the contract: a fallback backend."""
    path = tmp_path / "writer.py"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, sys
        json.load(sys.stdin)
        print(json.dumps({{"text": json.dumps({examples.BLUEPRINT!r}), "model": "fixture-writer"}}))
    """))
    path.chmod(0o755)
    return CustomSettings(type="custom", name="writer", command=[str(path)])


@dataclasses.dataclass
class Served:
    miner: Any
    config: str
    validator: Any  # a bt.Wallet registered with a validator permit


@pytest.fixture
def chain_miner(tmp_path, writer):
    """start(external_ip, serve_fails=None, row=None, others=()): a chain-mode miner (a real Axon on loopback,
    answering with `writer`) registered next to one validator and `others`; `row`: its own Neuron fields."""
    from miner.config import load_config
    from miner.demo import free_port, make_wallet
    from miner.neuron import Miner
    from miner.service import StoryService
    from backends.chain import Chain
    from tests.fakes import Neuron, Subtensor
    started: list[Miner] = []

    def start(external_ip: str, serve_fails: str | None = None, row: dict[str, Any] | None = None,
              others: tuple[Neuron, ...] = ()) -> Served:
        wallet, validator = make_wallet(str(tmp_path), "miner"), make_wallet(str(tmp_path), "validator")
        chain = Subtensor([Neuron(wallet.hotkey.ss58_address, **(row or {})),
                           Neuron(validator.hotkey.ss58_address, 500.0, True, "8.8.8.8", 8091), *others],
                          serve_fails=serve_fails)
        config = tmp_path / "miner.yaml"
        config.write_text(
            f"axon:\n  ip: 127.0.0.1\n  port: {free_port()}\n  external_ip: {external_ip}\n"
            f"health:\n  port: {free_port()}\nbackends:\n  - type: custom\n    command: [{writer.command[0]}]\n")
        settings = load_config(config)
        service = StoryService(Chain.from_config(settings.backends, settings.chain), settings.generation)
        served = Miner(settings, service, wallet, offline=False, subtensor=chain)
        started.append(served)
        served.start()
        return Served(served, str(config), validator)

    yield start
    for one in started:
        one.close()


@pytest.fixture(scope="module")
def miner_from_memory(tmp_path_factory):
    """An offline miner on loopback whose one backend answers from a queue (tests/fakes.py): what is on the
    wire, with no model's time in it. Yields (miner, backend, a validator's Dendrite)."""
    import bittensor as bt
    from miner.config import Config, GenerationSettings
    from miner.demo import make_wallet, start_offline_miner
    from miner.neuron import no_public_ip_lookup
    from miner.service import StoryService
    from tests.fakes import FakeBackend, chain_of
    wallets = str(tmp_path_factory.mktemp("wallets"))
    validator = make_wallet(wallets, "validator")
    backend = FakeBackend("memory")
    with no_public_ip_lookup():
        miner = start_offline_miner(Config(), StoryService(chain_of(backend, cooldown_s=0.0), GenerationSettings()),
                                    wallets, [validator.hotkey.ss58_address])
        try:
            yield miner, backend, bt.Dendrite(wallet=validator)
        finally:
            miner.close()


@pytest.fixture
def running_health(capsys):
    """health(config, *args) -> (exit code, what `health --running` printed)."""
    from miner.cli import main as cli

    def health(config: str, *args: str) -> tuple[int, str]:
        code = cli(["health", "--config", config, "--running", *args])
        return code, capsys.readouterr().out
    return health


# The conversion tests' checkpoints and conversions, made once for the run: tests/test_experts_in_ram.py loads
# the same converted Mixtral (converting one takes about 10 s).
@pytest.fixture(scope="session")
def vocab_files():
    from models.hf_to_gguf import CONVERTER_FILES
    from models.llama_cpp_source import llama_cpp_tree
    from tests.real_tokenizers import VOCABS
    from tests.test_convert import VOCAB_FILES
    # The converter's files too, fetched here once rather than by two conversions at the same time.
    tree = llama_cpp_tree([*VOCAB_FILES, *CONVERTER_FILES])
    return {name: tree / f"models/ggml-vocab-{name}.gguf" for name in VOCABS}


@pytest.fixture(scope="session")
def convert_bench(tmp_path_factory, vocab_files):
    from tests.test_convert import Bench
    bench = Bench(tmp_path_factory.mktemp("convert"), vocab_files)
    yield bench
    bench.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def checkpoints(convert_bench):
    return convert_bench.checkpoints


@pytest.fixture(scope="session")
def converted(convert_bench):
    return convert_bench.converted
