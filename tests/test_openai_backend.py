"""The OpenAI backend against a real OpenAI-compatible server on loopback: llama-cpp-python's own server
(`llama_cpp.server`) serving the embedded SmolLM2 model. One server for the whole module (slow CPUs)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from backends.base import BackendError, Request
from backends.chain import Chain
from backends.openai_api import OpenAIBackend, OpenAISettings
from miner import examples
from miner.config import ChainSettings, load_config
from miner.demo import free_port
from miner.cli import main as cli
from miner.service import StoryService
from models.embedded import embedded_model_path

pytestmark = pytest.mark.slow  # llama-cpp-python's server with the embedded model

ALIAS = "smollm2"
MISSING_ENV = "STORYNET_TEST_KEY_THAT_IS_NOT_SET"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """llama_cpp.server on a free loopback port; yields its base_url once /v1/models answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"],
            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"llama_cpp.server did not come up:\n{log_path.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def settings(url: str, **kw) -> OpenAISettings:
    return OpenAISettings(**{"type": "openai", "name": "llama-server", "model": ALIAS, "base_url": url,
                             "api_key_env": None, **kw})


def request(content: str, max_tokens: int, schema=None) -> Request:
    return Request(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                   deadline=time.monotonic() + 60, schema=schema, temperature=0.0)


def test_plain_generation_is_reported_as_api(server):
    backend = OpenAIBackend.from_settings(settings(server))
    generation = backend.generate(request("Name a colour.", max_tokens=6))
    assert generation.text.strip()
    assert 0 < generation.completion_tokens <= 6 and generation.prompt_tokens > 0
    assert (generation.model.mode, generation.model.name, generation.model.provider) == (
        "api", ALIAS, "openai-compatible")
    assert generation.backend == "llama-server"


def test_a_server_without_json_schema_gets_the_schema_the_way_it_takes_it(server, caplog):
    # llama-cpp-python's server refuses response_format json_schema (HTTP 500 naming response_format) but
    # constrains output to a schema sent with json_object: the backend steps down once and remembers.
    backend = OpenAIBackend.from_settings(settings(server))
    schema = {"type": "object", "properties": {"answer": {"const": "yes"}, "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    with caplog.at_level(logging.WARNING, logger="backends.openai_api"):
        generation = backend.generate(request("Is the sky blue? Give a number too.", 24, schema))
    assert json.loads(generation.text)["answer"] == "yes"
    assert backend.info().parameters["structured_output"] == "json_object+schema"
    assert "refused response_format json_schema" in caplog.text


def test_json_mode_states_the_schema_in_the_prompt(server):
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    plain = OpenAIBackend.from_settings(settings(server, structured_output="json_object"))
    with_schema = plain.generate(request("Name a colour.", 4, schema))
    without = plain.generate(request("Name a colour.", 4))
    assert plain.info().parameters["structured_output"] == "json_object"
    assert with_schema.prompt_tokens > without.prompt_tokens + 10  # the schema note went in
    assert with_schema.text.lstrip().startswith("{")  # the server's JSON mode


def test_health_checks_the_model_against_the_server(server):
    listed = OpenAIBackend.from_settings(settings(server)).health()
    assert listed.ok and listed.detail.endswith(f"serves {ALIAS}")
    # llama-cpp-python's server answers any model name: an unlisted one is checked by a real call.
    unlisted = OpenAIBackend.from_settings(settings(server, model="gpt-17")).health()
    assert unlisted.ok and "one-token request for gpt-17" in unlisted.detail and ALIAS in unlisted.detail


def test_a_missing_key_names_the_variable_and_marks_only_that_backend_down(server, monkeypatch, caplog):
    monkeypatch.delenv(MISSING_ENV, raising=False)
    with pytest.raises(BackendError, match=MISSING_ENV):
        OpenAIBackend.from_settings(settings(server, name="cloud", api_key_env=MISSING_ENV))
    with caplog.at_level(logging.WARNING, logger="backends.chain"):
        chain = Chain.from_config([settings(server, name="cloud", api_key_env=MISSING_ENV), settings(server)],
                                  ChainSettings())
    assert chain.states[0].backend is None and MISSING_ENV in chain.states[0].build_error
    assert f"backend cloud is down: environment variable {MISSING_ENV}" in caplog.text
    _, generation = chain.generate(request("Say hi.", 4), lambda g: g.text)
    assert generation.backend == "llama-server"
    monkeypatch.setenv(MISSING_ENV, "sk-test-not-a-real-key")
    assert OpenAIBackend.from_settings(settings(server, api_key_env=MISSING_ENV)).health().ok


def test_a_server_that_is_not_there_fails_health_and_generation():
    backend = OpenAIBackend.from_settings(settings(f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_s=2))
    assert not backend.health().ok
    with pytest.raises(BackendError, match="did not answer.*2 tries"):
        backend.generate(request("Hi", 2))


def bad_model_files(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"<html>404 Not Found</html>" * 100)
    truncated = tmp_path / "truncated.gguf"
    with embedded_model_path().open("rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    return {"missing": tmp_path / "gone.gguf", "corrupt": corrupt, "truncated": truncated}


def write_config(tmp_path: Path, model_path: Path, url: str, health_port: int = 0) -> Path:
    path = tmp_path / "miner.yaml"
    path.write_text(f"""
generation:
  temperature: 0.0
health:
  port: {health_port}
backends:
  - type: llama_cpp
    name: local
    model_path: {model_path}
  - type: openai
    name: llama-server
    model: {ALIAS}
    base_url: {url}
    api_key_env: null
""")
    return path


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated"])
def test_a_broken_local_model_is_down_with_its_file_named(server, tmp_path, problem):
    model_path = bad_model_files(tmp_path)[problem]
    config = load_config(write_config(tmp_path, model_path, server))
    chain = Chain.from_config(config.backends, config.chain)
    try:
        local, api = chain.states
        assert local.backend is None and str(model_path) in local.build_error
        assert api.backend is not None
    finally:
        chain.close()


def test_the_validator_gets_a_real_answer_from_the_api_when_the_local_model_is_gone(server, tmp_path):
    config = load_config(write_config(tmp_path, tmp_path / "gone.gguf", server))
    service = StoryService(Chain.from_config(config.backends, config.chain), config.generation)
    try:
        answer = service.answer(examples.example_fields("blueprint"))
    finally:
        service.chain.close()
    assert answer.ok, answer.output
    assert answer.output["model_info"]["mode"] == "api" and answer.output["model_info"]["name"] == ALIAS
    assert answer.model_info == answer.output["model_info"]
    assert set(answer.output) >= {"title", "genre", "setting", "core_conflict", "themes", "tone", "target_audience"}


def test_health_says_degraded_while_the_api_serves_for_a_missing_model(server, tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "gone.gguf", server)
    assert cli(["health", "--config", str(config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "degraded" and report["serving"] == "llama-server"
    local, api = report["backends"]
    assert (local["ok"], local["mode"], api["ok"], api["mode"]) == (False, "local", True, "api")
    assert "gone.gguf" in local["detail"]
