"""`run`'s start-up checks: each failure is one line naming the fix and exit 2, before any model loads.

Real wallets in a temp dir, real sockets, a real closed port for an unreachable chain; the chain itself only
where no chain can run (a registered or unregistered hotkey), in memory (tests/fake_chain.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from miner.cli import serve
from miner.config import load_config
from miner.demo import free_port, make_wallet
from miner.errors import StartupError
from miner.startup import check_model
from tests.fakes import Neuron, Subtensor

ROOT = Path(__file__).resolve().parents[1]


def config_file(tmp_path: Path, extra: str = "", model: str = "model_path: {tmp}/model.gguf",
                health_port: int = 0) -> Path:
    """Chain mode on free ports with the wallet in tmp_path; the model file is never needed, since every
    failure here must come before any model loads."""
    path = tmp_path / "miner.yaml"
    path.write_text(f"wallet:\n  path: {tmp_path}\naxon:\n  ip: 127.0.0.1\n  port: {free_port()}\n"
                    f"  external_ip: 5.9.10.11\nhealth:\n  port: {health_port}\n{extra}"
                    f"backends:\n  - type: llama_cpp\n    {model.format(tmp=tmp_path)}\n")
    return path


class NeverBuilt:
    """The service builder `serve` calls once the checks pass: here it must never be called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config):
        self.calls += 1
        raise AssertionError("the model would load before the start-up checks finished")


def refused(tmp_path: Path, config: Path, connect=None, offline: bool = False) -> str:
    builder = NeverBuilt()
    with pytest.raises(StartupError) as failed:
        serve(load_config(config), offline, str(config), connect=connect, build_service=builder)
    assert builder.calls == 0
    message = str(failed.value)
    assert "\n" not in message
    return message


def test_an_unreadable_hotkey_names_the_file_the_user_and_the_fix(tmp_path):
    wallet = make_wallet(str(tmp_path), "default")
    hotkey = Path(wallet.hotkey_file.path)
    hotkey.chmod(0)  # bittensor_wallet judges the mode bits, so this holds for root as well
    message = refused(tmp_path, config_file(tmp_path))
    assert message.startswith(f"wallet: the hotkey file {hotkey} cannot be read by ")
    assert "mode 0" in message and "run the miner as the wallet's owner (systemd User=" in message


def test_a_missing_wallet_says_which_files_to_copy(tmp_path):
    message = refused(tmp_path, config_file(tmp_path))
    assert f"the hotkey file {tmp_path}/default/hotkeys/default does not exist" in message
    assert "copy hotkeys/default and coldkeypub.txt" in message


def test_the_coldkey_itself_is_not_needed(tmp_path):
    wallet = make_wallet(str(tmp_path), "default")
    os.remove(wallet.coldkey_file.path)  # a mining box holds the hotkey and coldkeypub.txt only
    chain = Subtensor([])  # reached the chain: the wallet passed
    assert "is not registered on netuid 92" in refused(tmp_path, config_file(tmp_path), chain.connect)


def test_an_unregistered_hotkey_names_the_btcli_command(tmp_path):
    wallet = make_wallet(str(tmp_path), "default")
    chain = Subtensor([Neuron("5C4hrfjw9DjXZTzV3MwzrrAr9P1MJhSrvWGWqi1eSuyUpnhM")])
    message = refused(tmp_path, config_file(tmp_path, extra="subtensor:\n  network: test\n"), chain.connect)
    assert chain.networks == ["test"]
    assert message.startswith(f"hotkey {wallet.hotkey.ss58_address} (default/default) is not registered on netuid 92")
    assert "`btcli subnets register --netuid 92 --wallet.name default --wallet.hotkey default`" in message


def test_an_unreachable_chain_is_named_by_its_key(tmp_path):
    make_wallet(str(tmp_path), "default")
    closed = free_port()  # nothing listens there
    config = config_file(tmp_path, extra=f"subtensor:\n  chain_endpoint: ws://127.0.0.1:{closed}\n")
    message = refused(tmp_path, config)
    assert message.startswith(f"subtensor.chain_endpoint ws://127.0.0.1:{closed}: cannot reach the chain (")
    assert "Connection refused" in message and "--offline" in message


@pytest.mark.parametrize("offline", [False, True], ids=["chain", "offline"])
def test_a_port_in_use_is_named_with_who_holds_it(tmp_path, offline):
    make_wallet(str(tmp_path), "default")
    config = config_file(tmp_path)
    port = load_config(config).axon.port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        message = refused(tmp_path, config, offline=offline)
    assert message.startswith(f"axon.port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert f"`ss -ltnp 'sport = :{port}'`" in message and "--axon.port" in message


def test_a_health_port_in_use_is_named_too(tmp_path):
    make_wallet(str(tmp_path), "default")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = refused(tmp_path, config_file(tmp_path, health_port=port), offline=True)
    assert message.startswith(f"health.port {port}: cannot listen") and "0 to turn GET /health off" in message


def test_chain_mode_refuses_the_demo_model_unless_the_config_says_so(tmp_path):
    make_wallet(str(tmp_path), "default")
    message = refused(tmp_path, config_file(tmp_path, model="name: local"))
    assert "backends.0 has no model_path, so validators on netuid 92 would get answers from the embedded demo model" \
        in message
    assert "allow_demo_model_on_chain: true" in message and "storynet-miner download llama-3.1-8b" in message
    allowed = load_config(config_file(tmp_path, extra="allow_demo_model_on_chain: true\n", model="name: local"))
    check_model(allowed, offline=False, source="x")
    check_model(load_config(config_file(tmp_path, model="name: local")), offline=True, source="x")  # offline keeps it


def test_a_demo_model_as_a_fallback_is_refused_too(tmp_path):
    model = "model_path: {tmp}/model.gguf\n  - type: llama_cpp\n    name: spare"  # a second one, without a file
    config = load_config(config_file(tmp_path, model=model))
    with pytest.raises(StartupError, match="^x: backends.1 has no model_path"):
        check_model(config, offline=False, source="x")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miner", "run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_the_issues_example_an_unreachable_chain_exits_2_with_one_line(tmp_path):
    make_wallet(str(tmp_path), "default")
    closed = free_port()
    line = one_error_line(run("--config", str(config_file(tmp_path)), "--subtensor.network", f"ws://127.0.0.1:{closed}"))
    assert f"ERROR miner: subtensor.network ws://127.0.0.1:{closed}: cannot reach the chain" in line


def test_run_without_a_config_refuses_the_demo_model_in_one_line():
    line = one_error_line(run("--subtensor.network", "ws://127.0.0.1:9"))
    assert "ERROR miner: the built-in defaults (no --config): backends.0 has no model_path" in line
