import re
from pathlib import Path

import pytest
import yaml

from backends import backend_class
from backends.llama_cpp import LlamaCppSettings
from miner.cli import _load, build_parser
from miner.config import Config, load_config
from miner.errors import ConfigError

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


def example(uncomment: bool = False) -> dict:
    text = (ROOT / "config.example.yaml").read_text()
    if uncomment:  # the fallback examples are commented out; they must be valid too
        head, backends = text.split("\nbackends:\n")
        text = head + "\nbackends:\n" + re.sub(r"^#(  [ -])", r"\1", backends, flags=re.MULTILINE)
    return yaml.safe_load(text)


def test_the_example_file_is_a_valid_config_with_valid_fallback_examples(tmp_path):
    assert [b.type for b in Config.model_validate(example()).backends] == ["llama_cpp"]
    config = Config.model_validate(example(uncomment=True))
    assert [b.type for b in config.backends] == ["llama_cpp", "openai", "gemini", "custom"]
    assert config.backends[1].api_key_env == "OPENAI_API_KEY"


def test_every_config_key_is_in_the_example_file():
    documented = example(uncomment=True)
    sections = {"": (Config, documented)}
    sections.update({name: (Config.model_fields[name].annotation, documented[name])
                     for name in documented if isinstance(documented[name], dict)})
    for backend in documented["backends"]:
        sections[backend["type"]] = (backend_class(backend["type"]).Settings, backend)
    for name, (model, keys) in sections.items():
        missing = set(model.model_fields) - set(keys)
        assert not missing, f"{name or 'top level'}: {sorted(missing)} not documented in config.example.yaml"


@pytest.mark.parametrize("yaml_text,expected", [
    ("backends:\n  - type: llama_cpp\n    n_ctx: 10\n", "backends.0.n_ctx: Value error, must be between 512 and 131072"),
    ("backends:\n  - type: llama_cpp\n    n_gpu_layer: 3\n",
     "backends.0.n_gpu_layer: Extra inputs are not permitted; did you mean n_gpu_layers?"),
    ("walet:\n  name: miner\n", "walet: Extra inputs are not permitted; did you mean wallet?"),
    ("axon:\n  externalip: 1.2.3.4\n", "axon.externalip: Extra inputs are not permitted; did you mean external_ip?"),
    ("backends:\n  - type: llama\n", "backends.0: Input tag 'llama' found using 'type' does not match"),
    ("backends:\n  - type: llama\n", "; did you mean llama_cpp?"),
    ("backends:\n  - type: ollama\n    model: llama3.1\n",
     "use type: openai, which talks to any OpenAI-compatible server, with base_url: http://127.0.0.1:11434/v1"),
    ("axon:\n  port: 700000\n", "axon.port: Input should be less than or equal to 65535"),
    ("generation:\n  target_s: 90\n", "generation.target_s"),
    ("backends:\n  - type: llama_cpp\n    parallel: 0\n", "backends.0.parallel: Value error, must be between 1"),
    ("backends:\n  - type: llama_cpp\n    kv_cache_type: q8_0\n    flash_attn: false\n", "q8_0 needs flash_attn"),
    ("backends:\n  - type: llama_cpp\n    parallel: 40\n    n_batch: 32\n", "parallel (40) must not exceed n_batch"),
    ("backends: []\n", "backends: List should have at least 1 item"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("netuid: [\n", "not valid YAML"),
])
def test_a_wrong_key_or_value_names_the_key(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, yaml_text))
    assert expected in str(err.value)
    assert "config.yaml" in str(err.value)


def test_a_key_far_from_any_gets_no_guess(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "generation:\n  colour: blue\n"))
    assert str(err.value).endswith("generation.colour: Extra inputs are not permitted")


def test_the_old_deadline_key_becomes_the_target_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="generation.deadline_s is now generation.target_s"):
        config = load_config(write(tmp_path, "generation:\n  deadline_s: 30\n"))
    assert config.generation.target_s == 30


def test_a_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="copy config.example.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bittensor_style_flags_override_the_file(tmp_path):
    path = write(tmp_path, "netuid: 1\nwallet:\n  name: alice\n")
    args = build_parser("run").parse_args(["run", "--config", str(path), "--netuid", "92", "--wallet.hotkey", "h1",
                                      "--axon.port", "9000", "--subtensor.network", "test"])
    config = _load(args)
    assert (config.netuid, config.wallet.name, config.wallet.hotkey) == (92, "alice", "h1")
    assert (config.axon.port, config.subtensor.network) == (9000, "test")
