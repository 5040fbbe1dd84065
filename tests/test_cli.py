"""`python -m miner` as an operator runs it: real processes, real exit codes, data on stdout."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from miner.contract import answer_of
from miner.demo import free_port
from miner.tasks import TASKS, Context

pytestmark = pytest.mark.slow  # miner processes with the embedded model

ROOT = Path(__file__).resolve().parents[1]


def miner(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miner", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, **kw)


def test_generate_prints_output_data_that_meets_the_contract():
    done = miner("generate", "--task", "blueprint", "--input", "A story about a lighthouse keeper")
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["model_info"]["mode"] == "local"
    TASKS["blueprint"].check(answer_of(output),
                             Context(user_input="x"))


def test_generate_reads_context_from_a_file(tmp_path):
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"chapter_ids": [0]}))
    done = miner("generate", "--task", "chapters", "--input", "x", "--context", str(context))
    assert done.returncode == 1
    assert "chapter_ids must be whole numbers" in json.loads(done.stdout)["error"]


def test_a_missing_model_file_stops_start_up_naming_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"backends:\n  - type: llama_cpp\n    model_path: {tmp_path}/gone.gguf\n")
    done = miner("generate", "--task", "blueprint", "--input", "x", "--config", str(config))
    assert done.returncode == 2 and done.stdout == ""
    assert f"{tmp_path}/gone.gguf does not exist" in done.stderr and "storynet-miner download" in done.stderr


def test_a_bad_config_key_stops_start_up_naming_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("generation:\n  deadline: 20\n")
    done = miner("generate", "--task", "blueprint", "--input", "x", "--config", str(config))
    assert done.returncode == 2 and "generation.deadline: Extra inputs are not permitted" in done.stderr


def test_run_offline_serves_until_sigterm_then_exits_cleanly(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"health:\n  port: 0\nwallet:\n  path: {tmp_path}\n")
    wallet = "from miner.demo import make_wallet; make_wallet(%r, 'default')" % str(tmp_path)
    subprocess.run([sys.executable, "-c", wallet], cwd=ROOT, check=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "miner", "run", "--offline", "--config", str(config),
                             "--axon.port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite if the miner never serves
    watchdog.start()
    try:
        for line in proc.stderr:
            if "axon serving" in line:
                break
        assert proc.poll() is None, "the miner exited before serving"
        assert f"127.0.0.1:{port}" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
