"""`run`'s start-up checks, all made before any model loads: a failure is one line that names what to fix,
and the miner exits 2 (miner/cli.py).

In order: no demo model on the chain by accident, the wallet's files readable by this user, the ports
free, then in chain mode the chain reachable, the hotkey registered on the netuid, and this machine's
public IP known. The chain connection is the boundary tests replace (`connect`).
"""
from __future__ import annotations

import errno
import os
import pwd
import socket
from typing import Any, Callable

import bittensor as bt
from bittensor.utils import networking
from bittensor_wallet import Wallet
from bittensor_wallet.errors import KeyFileError

from miner.config import Config
from miner.errors import StartupError

LOOPBACK = "127.0.0.1"
NO_DEMO_KEY = "allow_demo_model_on_chain"


def check_model(config: Config, offline: bool, source: str) -> None:
    """Chain mode answers validators with a real model unless the config explicitly allows the demo one."""
    if offline or config.allow_demo_model_on_chain:
        return
    demo = [i for i, b in enumerate(config.backends) if b.type == "llama_cpp" and not b.model_path]
    if demo:
        raise StartupError(
            f"{source}: backends.{demo[0]} has no model_path, so validators on netuid {config.netuid} would get "
            f"answers from the embedded demo model (SmolLM2-135M, made for trying the miner out): set "
            f"backends.{demo[0]}.model_path to a GGUF file (`.venv/bin/storynet-miner download "
            f"llama-3.1-8b` prints the lines), or set {NO_DEMO_KEY}: true to mine with the demo model anyway")


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container user without a passwd entry
        return str(os.geteuid())


def _check_keyfile(keyfile: Any, what: str, config: Config) -> None:
    path = keyfile.path
    w = config.wallet
    if not keyfile.exists_on_device():
        raise StartupError(
            f"wallet: {what} {path} does not exist (wallet.name {w.name}, wallet.hotkey {w.hotkey}, wallet.path "
            f"{w.path}): copy hotkeys/{w.hotkey} and coldkeypub.txt from the machine where the wallet was made "
            "(README, \"Mining on subnet 92\"), or point --wallet.name, --wallet.hotkey, --wallet.path at them")
    if not keyfile.is_readable():
        st, user = os.stat(path), _user()
        raise StartupError(
            f"wallet: {what} {path} cannot be read by user {user} (uid {os.geteuid()}): it belongs to uid "
            f"{st.st_uid} with mode {st.st_mode & 0o777:03o}; run the miner as the wallet's owner (systemd User=, "
            f"or the user that runs pm2), or give the file to this user (`sudo chown {user} {path}`)")
    if keyfile.is_encrypted():
        raise StartupError(
            f"wallet: {what} {path} is encrypted, and a miner running unattended has no one to type its password: "
            "use a hotkey made without one (btcli's default for hotkeys)")


def load_wallet(config: Config) -> Wallet:
    """The hotkey signs and coldkeypub.txt names the owner; the coldkey itself never needs to be here."""
    w = config.wallet
    wallet = Wallet(name=w.name, hotkey=w.hotkey, path=w.path)
    _check_keyfile(wallet.hotkey_file, "the hotkey file", config)
    _check_keyfile(wallet.coldkeypub_file, "the coldkey's public file", config)
    try:
        _ = (wallet.hotkey, wallet.coldkeypub)  # loading them is the check
    except KeyFileError as e:
        raise StartupError(f"wallet: cannot load {w.name}/{w.hotkey} from {w.path}: {e}") from None
    return wallet


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _check_port(host: str, port: int, key: str, fix: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and http.server bind
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                fix = f"another program holds it (`ss -ltnp 'sport = :{port}'` shows which): stop it, or {fix}"
            raise StartupError(f"{key} {port}: cannot listen on {host}:{port} ({e.strerror}); {fix}") from None


def check_ports(config: Config, offline: bool) -> None:
    a = config.axon
    _check_port(LOOPBACK if offline else a.ip, a.port, "axon.port",
                "pick another with --axon.port (and forward that one)")
    if config.health.port:
        _check_port(LOOPBACK, config.health.port, "health.port",
                    "set health.port to a free port, or 0 to turn GET /health off")


def with_external_ip(config: Config) -> Config:
    """The public IP to serve on chain: axon.external_ip, or looked up once here rather than inside the Axon."""
    if config.axon.external_ip:
        return config
    try:
        ip = networking.get_external_ip()
    except Exception as e:  # bittensor tries several web services and raises its own error when all fail
        raise StartupError(f"axon.external_ip is not set and this machine's public IP could not be looked up "
                           f"({_why(e)}): set axon.external_ip (--axon.external_ip) to the IP "
                           "validators should use") from None
    return config.model_copy(update={"axon": config.axon.model_copy(update={"external_ip": ip})})


def connect_chain(config: Config, wallet: Wallet, connect: Callable[..., Any] | None = None) -> Any:
    """A subtensor that answers (made by connect, bt.Subtensor by default), and the hotkey registered on the
    netuid."""
    s = config.subtensor
    key, endpoint = (("subtensor.chain_endpoint", s.chain_endpoint) if s.chain_endpoint
                     else ("subtensor.network", s.network))
    hotkey = wallet.hotkey.ss58_address
    try:
        subtensor = (connect or bt.Subtensor)(network=endpoint)
        registered = subtensor.is_hotkey_registered(hotkey_ss58=hotkey, netuid=config.netuid)
    except Exception as e:  # websockets, DNS and substrate errors alike: the chain cannot be used from here
        raise StartupError(f"{key} {endpoint}: cannot reach the chain ({_why(e)}); check the "
                           f"address and this machine's internet connection, or try the miner without a chain "
                           f"with --offline") from None
    if not registered:
        w = config.wallet
        raise StartupError(
            f"hotkey {hotkey} ({w.name}/{w.hotkey}) is not registered on netuid {config.netuid}: register it "
            f"with `btcli subnets register --netuid {config.netuid} --wallet.name {w.name} --wallet.hotkey "
            f"{w.hotkey}` where the coldkey is (README, \"Mining on subnet 92\"), or try the miner with --offline")
    return subtensor


def check(config: Config, offline: bool, source: str,
          connect: Callable[..., Any] | None = None) -> tuple[Config, Wallet, Any]:
    """Every check in order; returns the config (with the public IP found), the wallet and the subtensor
    (None offline)."""
    check_model(config, offline, source)
    wallet = load_wallet(config)
    check_ports(config, offline)
    if offline:
        return config, wallet, None
    subtensor = connect_chain(config, wallet, connect)
    return with_external_ip(config), wallet, subtensor
