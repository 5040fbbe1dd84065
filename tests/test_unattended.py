"""Running unattended: `health --running` as a watchdog (exit 0/1/2, never loading a model of its own),
and logs on stderr at the level the config sets, which the flag overrides and bittensor does not swallow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from backends.chain import BackendStatus
from miner.demo import free_port, make_wallet
from miner.cli import main as cli
from miner.health import AxonState, HealthReport
from miner.health_monitor import HealthServer

ROOT = Path(__file__).resolve().parents[1]
GOOD = 'import json, sys\njson.load(sys.stdin)\nprint(json.dumps({"text": "{}"}))\n'
BAD = "import sys\nsys.stderr.write('backend broke')\nsys.exit(1)\n"


def program(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def report(*backend_ok: bool) -> HealthReport:
    backends = [BackendStatus(f"b{i}", "custom", "custom", ok, "", 0.0, 0) for i, ok in enumerate(backend_ok)]
    return HealthReport.of(backends, AxonState("127.0.0.1:8091", True, "accepting connections"), "c.yaml", "test")


@pytest.mark.parametrize("state, code", [((True, True), 0), ((False, True), 1), ((False, False), 2)],
                         ids=["healthy", "degraded", "down"])
def test_the_watchdog_check_exits_with_the_running_miners_state(tmp_path, capsys, state, code):
    server = HealthServer("127.0.0.1", 0, lambda: report(*state))
    server.start()
    # A model that does not exist: had the command checked the backends itself, it would say down.
    config = tmp_path / "miner.yaml"
    config.write_text(f"health:\n  port: {server.port}\nbackends:\n  - type: llama_cpp\n"
                      f"    model_path: {tmp_path / 'gone.gguf'}\n")
    try:
        assert cli(["health", "--config", str(config), "--running", "--json"]) == code
    finally:
        server.stop()
    assert json.loads(capsys.readouterr().out)["checked_by"] == "test"


def test_the_watchdog_check_says_down_when_no_miner_answers(tmp_path, capsys):
    port = free_port()
    config = tmp_path / "miner.yaml"
    config.write_text(f"health:\n  port: {port}\nbackends:\n  - type: custom\n"
                      f"    command: [{program(tmp_path, 'good.py', GOOD)}]\n")
    assert cli(["health", "--config", str(config), "--running", "--wait", "1"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"DOWN (exit 2): no running miner answered GET http://127.0.0.1:{port}/health within 1 s")
    assert cli(["health", "--config", str(config), "--wait", "1"]) == 0  # without --running: checked here


def test_the_watchdog_check_needs_the_health_port(tmp_path, capsys):
    config = tmp_path / "miner.yaml"
    config.write_text("health:\n  port: 0\n")
    assert cli(["health", "--config", str(config), "--running"]) == 2
    assert "health.port is 0 in the config; set it" in capsys.readouterr().out


def test_every_command_s_help_lists_the_one_exit_code_table(capsys):
    for command in ("health", "fit", "download", "run"):
        with pytest.raises(SystemExit) as done:
            cli([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes (every command):\n  0    done (health: healthy" in out and "health: degraded" in out
        assert "\n  2    could not do it" in out and "health: down" in out


def generate(config: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miner", "generate", "--task", "blueprint", "--input", "x",
                           "--config", str(config), *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_log_level_comes_from_the_config_and_the_flag_overrides_it(tmp_path):
    backends = f"backends:\n  - type: custom\n    name: broken\n    command: [{program(tmp_path, 'bad.py', BAD)}]\n"
    default, quiet = tmp_path / "default.yaml", tmp_path / "quiet.yaml"
    default.write_text(backends)
    quiet.write_text("log_level: ERROR\n" + backends)
    warning = "WARNING backends.chain: backend broken failed"
    assert warning in generate(default).stderr  # INFO by default
    quieted = generate(quiet)
    assert quieted.returncode == 1 and "backend broke" in quieted.stdout
    assert warning not in quieted.stderr
    assert warning in generate(quiet, "--log-level", "WARNING").stderr


@pytest.mark.slow
def test_debug_logs_of_a_running_miner_survive_bittensor(tmp_path):
    """bittensor resets loggers when imported; the miner's own DEBUG lines must still reach stderr."""
    make_wallet(str(tmp_path), "default")
    health_port = free_port()
    config = tmp_path / "miner.yaml"
    config.write_text(f"log_level: DEBUG\nwallet:\n  path: {tmp_path}\nhealth:\n  port: {health_port}\n"
                      f"backends:\n  - type: custom\n    command: [{program(tmp_path, 'good.py', GOOD)}]\n")
    proc = subprocess.Popen([sys.executable, "-m", "miner", "run", "--offline", "--config", str(config),
                             "--axon.port", str(free_port())], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite if the miner never serves
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "axon serving" in line:
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/health", timeout=10).read()
            if "DEBUG miner.health_monitor: health http:" in line:
                break
        else:
            pytest.fail("the miner's DEBUG line never came:\n" + "".join(seen[-20:]))
        assert "GET /health" in line
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_watchdog_script_restarts_after_three_downs_in_a_row_and_forgets_a_miss(tmp_path):
    server = HealthServer("127.0.0.1", 0, lambda: report(False, True))  # degraded: no restart for that
    config = tmp_path / "miner.yaml"
    config.write_text(f"health:\n  port: {free_port()}\n")
    restarted = tmp_path / "restarted"
    env = {**os.environ, "WATCHDOG_STATE": str(tmp_path / "misses")}

    def check(config_file: Path) -> None:
        subprocess.run([str(ROOT / "scripts" / "watchdog.sh"), str(config_file), "touch", str(restarted)],
                       env=env, check=True, timeout=60, capture_output=True)

    check(config)
    server.start()
    try:
        answering = tmp_path / "answering.yaml"
        answering.write_text(f"health:\n  port: {server.port}\n")
        check(answering)  # degraded: the miss before is forgotten
    finally:
        server.stop()
    check(config)
    check(config)
    assert not restarted.exists()
    check(config)
    assert restarted.exists()
