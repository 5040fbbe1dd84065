"""`python -m miner health` exit codes in each state, and a running miner's GET /health.

Backends are real: the embedded model in llama.cpp, and custom commands (cheap real programs) as the
fallbacks whose health can be switched by rewriting them."""
from __future__ import annotations

import json
import logging
import socket
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import llama_cpp
import pytest

from backends.chain import BackendStatus, Chain
from miner.config import load_config
from miner.demo import free_port, make_wallet
from miner.errors import ConfigError
from miner.cli import main as cli
from miner.health import AxonState, HealthReport
from miner.health_monitor import HealthServer
from miner.neuron import Miner
from miner.service import StoryService

MISSING_ENV = "STORYNET_TEST_KEY_THAT_IS_NOT_SET"
GOOD = 'import json, sys\njson.load(sys.stdin)\nprint(json.dumps({"text": "{}"}))\n'
BAD = "import sys\nsys.stderr.write('backend broke')\nsys.exit(1)\n"


def program(tmp_path: Path, name: str, body: str = GOOD) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def config_file(tmp_path: Path, backends: str, extra: str = "health:\n  port: 0\n") -> Path:
    path = tmp_path / "miner.yaml"
    path.write_text(extra + "backends:\n" + textwrap.indent(textwrap.dedent(backends), "  "))
    return path


def run(capsys, config: Path, *flags: str) -> tuple[int, str]:
    code = cli(["health", "--config", str(config), *flags])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_healthy_when_the_first_backend_serves(tmp_path, capsys):
    config = config_file(tmp_path, f"""
        - type: llama_cpp
        - type: custom
          name: spare
          command: [{program(tmp_path, 'spare.py')}]
    """)
    code, out = run(capsys, config)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "HEALTHY (exit 0): serving on llama_cpp"
    assert any(line.split()[:4] == ["llama_cpp", "llama_cpp", "local", "ok"] for line in lines)
    assert any(line.split()[:4] == ["spare", "custom", "custom", "ok"] for line in lines)


def test_degraded_when_only_a_fallback_serves(tmp_path, capsys):
    config = config_file(tmp_path, f"""
        - type: llama_cpp
          model_path: {tmp_path / 'deleted.gguf'}
        - type: custom
          name: spare
          command: [{program(tmp_path, 'spare.py')}]
    """)
    code, out = run(capsys, config, "--json")
    report = json.loads(out)
    assert code == 1 == report["exit_code"] and report["status"] == "degraded"
    assert report["serving"] == "spare" and "fallback spare" in report["summary"]
    assert "deleted.gguf does not exist" in report["backends"][0]["detail"]
    assert report["axon"]["ok"] is None  # no miner runs: the axon is reported, not judged


def test_down_when_nothing_can_serve(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MISSING_ENV, raising=False)
    config = config_file(tmp_path, f"""
        - type: llama_cpp
          model_path: {tmp_path / 'deleted.gguf'}
        - type: openai
          model: gpt-4o-mini
          api_key_env: {MISSING_ENV}
        - type: custom
          command: [{program(tmp_path, 'broken.py', BAD)}]
    """)
    code, out = run(capsys, config)
    assert code == 2
    assert out.startswith("DOWN (exit 2): no backend can serve")
    assert f"environment variable {MISSING_ENV}" in out and "backend broke" in out


def test_down_when_the_config_is_broken(tmp_path, capsys):
    code, out = run(capsys, config_file(tmp_path, "- type: llama_cpp\n  n_ctx: 10\n"), "--json")
    report = json.loads(out)
    assert code == 2 and report["status"] == "down" and "n_ctx" in report["summary"]
    assert "must be between 512 and 131072" in report["summary"]


@pytest.mark.slow
def test_gpu_layers_asked_of_a_build_without_gpu_offload_are_flagged(tmp_path, capsys):
    config = config_file(tmp_path, f"""
        - type: llama_cpp
          n_gpu_layers: -1
        - type: custom
          name: spare
          command: [{program(tmp_path, 'spare.py')}]
    """)
    code, out = run(capsys, config, "--json")
    local = json.loads(out)["backends"][0]
    if llama_cpp.llama_supports_gpu_offload():
        assert code == 0 and local["ok"]
    else:
        assert code == 1 and not local["ok"] and "n_gpu_layers is -1, but the model runs on the CPU" in local["detail"]
        assert "has no GPU offload" in local["detail"] and "scripts/setup.sh --cuda" in local["detail"]


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def running_miner(tmp_path):
    """A real offline miner (Axon on loopback) with two custom backends and GET /health on a free port."""
    health_port = free_port()
    first, second = program(tmp_path, "first.py"), program(tmp_path, "second.py")
    path = config_file(tmp_path, f"""
        - type: custom
          name: first
          command: [{first}]
        - type: custom
          name: second
          command: [{second}]
    """, extra=f"health:\n  port: {health_port}\n  interval_s: 5\naxon:\n  port: {free_port()}\n")
    config = load_config(path)
    service = StoryService(Chain.from_config(config.backends, config.chain), config.generation)
    with tempfile.TemporaryDirectory() as wallets:
        miner = Miner(config, service, make_wallet(wallets, "health-test"), offline=True)
        miner.start()
        try:
            yield miner, path, health_port, first, second
        finally:
            miner.close()


@pytest.mark.slow
def test_a_running_miner_serves_its_health_and_rechecks_it(running_miner, capsys, caplog):
    miner, path, port, first, second = running_miner
    status, report = get_health(port)
    assert status == 200 and report["status"] == "healthy" and report["axon"]["ok"] is True
    code, out = run(capsys, path, "--json")
    assert code == 0 and json.loads(out)["checked_by"].startswith("running miner")

    first.write_text(f"#!{sys.executable}\n{BAD}")
    with caplog.at_level(logging.INFO, logger="miner.health_monitor"):
        for _ in range(40):  # the periodic re-check (every 5 s) notices, and logs the change
            status, report = get_health(port)
            if report["status"] != "healthy" and "health: degraded" in caplog.text:
                break
            time.sleep(0.5)
    assert status == 200 and report["status"] == "degraded" and report["serving"] == "second"
    assert "backend first is down: first: the command exited with status 1: backend broke" in caplog.text
    assert run(capsys, path)[0] == 1

    second.write_text(f"#!{sys.executable}\n{BAD}")
    miner.health.check_now()
    status, report = get_health(port)
    assert status == 503 and report["status"] == "down"
    assert run(capsys, path)[0] == 2


def test_the_health_server_serves_only_health_and_names_a_busy_port():
    report = HealthReport.down("nothing here", "test.yaml", "a test")
    server = HealthServer("127.0.0.1", 0, lambda: report)
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert e.value.code == 404
        status, served = get_health(server.port)
        assert status == 503 and HealthReport.from_json(served) == report
        with pytest.raises(ConfigError, match=f"health.port {server.port}.*0 to turn GET /health off"):
            HealthServer("127.0.0.1", server.port, lambda: report)
    finally:
        server.stop()
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_a_report_survives_json_and_refuses_what_is_not_one():
    backends = [BackendStatus("local", "llama_cpp", "local", False, "model file gone", 12.0, 3, 2),
                BackendStatus("spare", "custom", "custom", True, "answered", 0.0, 1, 0)]
    report = HealthReport.of(backends, AxonState("127.0.0.1:8091", True, "accepting connections"), "c.yaml", "test")
    assert (report.status, report.exit_code, report.serving) == ("degraded", 1, "spare")
    data = json.loads(json.dumps(report.to_json()))
    assert data["exit_code"] == 1 and data["backends"][0]["detail"] == "model file gone"
    assert (data["backends"][0]["served"], data["backends"][0]["busy"]) == (3, 2)
    assert HealthReport.from_json(data) == report
    lines = report.render().splitlines()
    assert lines[0] == "DEGRADED (exit 1): serving on fallback spare (local is down)"
    assert lines[3].split()[4:6] == ["SERVED", "BUSY"] and lines[4].split()[:6] == ["local", "llama_cpp", "local",
                                                                                    "down", "3", "2"]
    older = {**data, "backends": [{k: v for k, v in b.items() if k != "busy"} for b in data["backends"]]}
    assert HealthReport.from_json(older).backends[0].busy == 0  # a miner from before busy was counted
    for broken in ({}, {"status": "fine"}, {**data, "backends": [{"name": "x"}]}, [1, 2]):
        with pytest.raises(ValueError):
            HealthReport.from_json(broken)
