from pathlib import Path

import pytest

from miner.cli import build_parser, _load
from pydantic import BaseModel

from miner.config import (Config, ConfigError, CustomSettings, GeminiSettings, LlamaCppSettings, OpenAISettings,
                          load_config)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_use_one_local_backend_with_the_embedded_model():
    config = load_config(None)
    assert config.netuid == 92
    assert config.backends == [LlamaCppSettings(type="llama_cpp")]
    assert config.backends[0].model_path is None and config.backends[0].n_gpu_layers == "auto"


def test_the_example_file_documents_a_valid_config():
    config = load_config(ROOT / "config.example.yaml")
    assert [b.type for b in config.backends] == ["llama_cpp", "openai", "gemini", "custom"]
    assert isinstance(config.backends[1], OpenAISettings) and config.backends[1].api_key_env == "OPENAI_API_KEY"


def test_every_config_key_is_in_the_example_file():
    text = (ROOT / "config.example.yaml").read_text()
    nested = [f.annotation for f in Config.model_fields.values()]
    sections = [Config, LlamaCppSettings, OpenAISettings, GeminiSettings, CustomSettings]
    sections += [m for m in nested if isinstance(m, type) and issubclass(m, BaseModel)]
    for model in sections:
        for key in model.model_fields:
            assert f"{key}:" in text, f"{model.__name__}.{key} is not documented in config.example.yaml"


@pytest.mark.parametrize("yaml_text,expected", [
    ("backends:\n  - type: llama_cpp\n    n_ctx: 10\n", "backends.0.n_ctx: Value error, must be between 512 and 131072"),
    ("backends:\n  - type: llama_cpp\n    n_gpu_layer: 3\n", "n_gpu_layer: Extra inputs are not permitted"),
    ("backends:\n  - type: llama\n", "backends.0: Input tag 'llama' found using 'type' does not match"),
    ("axon:\n  port: 700000\n", "axon.port: Input should be less than or equal to 65535"),
    ("generation:\n  deadline_s: 90\n", "generation.deadline_s"),
    ("backends: []\n", "backends: List should have at least 1 item"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("netuid: [\n", "not valid YAML"),
])
def test_a_wrong_key_or_value_names_the_key(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, yaml_text))
    assert expected in str(err.value)
    assert "config.yaml" in str(err.value)


def test_a_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="copy config.example.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bittensor_style_flags_override_the_file(tmp_path):
    path = write(tmp_path, "netuid: 1\nwallet:\n  name: alice\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--netuid", "92", "--wallet.hotkey", "h1",
                                      "--axon.port", "9000", "--subtensor.network", "test"])
    config = _load(args)
    assert (config.netuid, config.wallet.name, config.wallet.hotkey) == (92, "alice", "h1")
    assert (config.axon.port, config.subtensor.network) == (9000, "test")
