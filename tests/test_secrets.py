"""A key planted in the environment (the variable api_key_env names) never shows in the logs (DEBUG, the
SDKs' and bittensor's loggers included), in `health --json`, in a running miner's GET /health, in an
answer or its model_info, or in an error text: not even when the server echoes the key back in a 401,
nor when it is down. A custom command gets none of the miner's keys.

The OpenAI-compatible server and the Gemini fake are loopback servers speaking the real wire formats
(tests/scripted_http.py); the SDKs are the real ones."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request

import pytest

from backends.chain import Chain
from backends.custom_command import CustomSettings
from backends.gemini_api import GeminiSettings
from backends.openai_api import OpenAISettings
from miner import examples
from miner.config import AxonSettings, ChainSettings, Config, GenerationSettings, HealthSettings
from miner.demo import free_port, make_wallet
from miner.cli import main as cli
from miner.neuron import Miner
from miner.service import StoryService
from tests.scripted_http import ScriptedHTTP
from tests.fakes import BLUEPRINT
from tests.test_gemini_backend import error, gemini_answer

KEY_ENV = "STORYNET_TEST_PLANTED_KEY"
KEY = "sk-planted-canary-" + "Q7xZ" * 8
REDACTED = f"<{KEY_ENV}: redacted>"
THIRD_PARTY = ("openai", "httpx", "httpcore", "httpx2", "httpcore2", "google_genai", "bittensor", "uvicorn")


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


@pytest.fixture
def logs(caplog):
    """Every record at DEBUG. Importing bittensor sets the loggers that exist then to CRITICAL: each of
    ours and the SDKs' is set back to DEBUG here (children too), so what they would log is seen."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("miner", "backends", *THIRD_PARTY):
            caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def assert_kept_secret(*texts: str, logs, sdk: str) -> None:
    for text in texts:
        assert KEY not in text
    assert KEY not in logs.text
    # The capture really had the SDK's records, and third-party DEBUG ones: else this test could not fail.
    assert any(r.name.startswith(sdk) for r in logs.records), sdk
    assert any(r.levelno == logging.DEBUG and r.name.split(".")[0] in THIRD_PARTY for r in logs.records)


def echoes_the_key_in_a_401() -> tuple[int, dict]:
    """A gateway that says which key it refused, in full."""
    return 401, {"error": {"message": f"Incorrect API key provided: {KEY}. Find your key at your dashboard.",
                           "type": "invalid_request_error", "code": "invalid_api_key"}}


def completion(text: str) -> tuple[int, dict]:
    return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-test-0613",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 50, "completion_tokens": 120, "total_tokens": 170}}


@pytest.fixture
def server():
    server = ScriptedHTTP(when_empty=echoes_the_key_in_a_401())
    yield server
    server.close()


def openai(url: str, **kw) -> OpenAISettings:
    return OpenAISettings(**{"type": "openai", "name": "cloud", "model": "gpt-test", "base_url": url,
                             "api_key_env": KEY_ENV, "timeout_s": 5, "max_retries": 0, **kw})


@contextlib.contextmanager
def chain_of(*settings):
    chain = Chain.from_config(list(settings), ChainSettings())
    try:
        yield chain
    finally:
        chain.close()


def ask(chain: Chain) -> dict:
    return StoryService(chain, GenerationSettings()).answer(examples.example_fields("blueprint")).output


def sent_key(server: ScriptedHTTP, header: str) -> str:
    return {k.lower(): v for k, v in server.requests[-1]["headers"].items()}[header]


def test_a_key_echoed_in_a_401_stays_out_of_the_answer_the_health_check_and_the_logs(key, logs, server):
    with chain_of(openai(f"{server.url}/v1")) as chain:
        output = ask(chain)
        assert sent_key(server, "authorization") == f"Bearer {KEY}"  # the planted key was used
        health = chain.probe(rebuild=False)[0]
    assert "HTTP 401" in output["error"] and REDACTED in output["error"]
    assert not health.ok and REDACTED in health.detail
    assert_kept_secret(json.dumps(output), health.detail, logs=logs, sdk="openai")


def test_a_server_that_is_down_leaves_no_key_in_the_error(key, logs):
    with chain_of(openai(f"http://127.0.0.1:{free_port()}/v1")) as chain:
        output = ask(chain)
    assert "did not answer" in output["error"]
    assert_kept_secret(json.dumps(output), logs=logs, sdk="openai")


def test_an_answer_and_its_model_info_carry_no_key(key, logs, server):
    server.replies.append(completion(json.dumps(BLUEPRINT)))
    with chain_of(openai(f"{server.url}/v1")) as chain:
        output = ask(chain)
    assert sent_key(server, "authorization") == f"Bearer {KEY}"
    assert "error" not in output, output
    assert output["model_info"] == {"mode": "api", "name": "gpt-test", "version": "gpt-test-0613",
                                    "provider": "openai-compatible", "parameters": {"structured_output": "json_schema"}}
    assert_kept_secret(json.dumps(output), logs=logs, sdk="openai")


def test_a_refused_response_format_naming_the_key_is_logged_without_it(key, logs, server):
    server.replies.append((400, {"error": {"message": f"response_format json_schema is not enabled for key {KEY}",
                                           "type": "invalid_request_error"}}))
    server.replies.append(completion(json.dumps(BLUEPRINT)))
    with chain_of(openai(f"{server.url}/v1")) as chain:
        output = ask(chain)
    assert "error" not in output, output
    assert f"refused response_format json_schema (Error code: 400 - response_format json_schema is not enabled " \
           f"for key {REDACTED})" in logs.text
    assert_kept_secret(json.dumps(output), logs=logs, sdk="openai")


def test_gemini_keeps_an_echoed_key_out_of_errors_and_logs(key, logs):
    fake = ScriptedHTTP(when_empty=error(400, "INVALID_ARGUMENT", f"API key not valid: {KEY}"))
    try:
        settings = GeminiSettings(type="gemini", api_key_env=KEY_ENV, base_url=fake.url, timeout_s=5, max_retries=0)
        with chain_of(settings) as chain:
            output = ask(chain)
            assert sent_key(fake, "x-goog-api-key") == KEY
            health = chain.probe(rebuild=False)[0]
            fake.replies.append((200, gemini_answer(json.dumps(BLUEPRINT))))
            served = ask(chain)
    finally:
        fake.close()
    assert REDACTED in output["error"] and REDACTED in health.detail
    assert "error" not in served and served["model_info"]["provider"] == "gemini"
    assert_kept_secret(json.dumps(output), health.detail, json.dumps(served), logs=logs, sdk="google_genai")


def test_health_json_shows_no_key(key, logs, server, tmp_path, capsys):
    config = tmp_path / "miner.yaml"
    config.write_text(f"health:\n  port: 0\nbackends:\n  - type: openai\n    name: cloud\n    model: gpt-test\n"
                      f"    base_url: {server.url}/v1\n    api_key_env: {KEY_ENV}\n")
    assert cli(["health", "--config", str(config), "--json"]) == 2
    out = capsys.readouterr().out
    assert json.loads(out)["status"] == "down" and REDACTED in out
    assert sent_key(server, "authorization") == f"Bearer {KEY}"
    assert_kept_secret(out, logs=logs, sdk="openai")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_a_running_miners_health_and_metrics_endpoints_show_no_key(key, logs, server, tmp_path):
    """A real miner (Axon on loopback) whose one backend is refused with the key echoed back."""
    port = free_port()
    config = Config(health=HealthSettings(port=port), axon=AxonSettings(port=free_port()),
                    backends=[openai(f"{server.url}/v1")])
    service = StoryService(Chain.from_config(config.backends, config.chain), config.generation)
    miner = Miner(config, service, make_wallet(str(tmp_path), "secrets-test"), offline=True)
    try:
        miner.start()
        status, body = get(f"http://127.0.0.1:{port}/health")
        scraped, metrics = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        miner.close()
        service.chain.close()
    assert status == 503 and json.loads(body)["status"] == "down" and REDACTED in body
    assert scraped == 200 and "storynet_miner_info" in metrics
    assert "backend cloud is down" in logs.text
    assert_kept_secret(body, metrics, logs=logs, sdk="openai")


# Writes its whole environment to a file and to stderr, then fails: what a careless or hostile program does.
DUMPS_ITS_ENVIRONMENT = """
import json, os, sys
open(sys.argv[1], "w").write(json.dumps(dict(os.environ)))
sys.stderr.write(json.dumps(dict(os.environ)))
sys.exit(1)
"""


def test_a_custom_command_gets_none_of_the_miners_keys(key, logs, server, tmp_path):
    program = tmp_path / "dump_env.py"
    program.write_text(f"#!{sys.executable}\n{DUMPS_ITS_ENVIRONMENT}")
    program.chmod(0o755)
    seen = tmp_path / "env.json"
    custom = CustomSettings(type="custom", name="mine", command=[str(program), str(seen)])
    with chain_of(openai(f"{server.url}/v1"), custom) as chain:  # the key is named in the YAML, and in use
        output = ask(chain)
    env = json.loads(seen.read_text())
    assert KEY_ENV not in env and KEY not in seen.read_text()
    assert "PATH" in env  # what a program needs to run still comes through
    assert "mine: the command exited with status 1" in output["error"]
    assert_kept_secret(json.dumps(output), logs=logs, sdk="openai")
