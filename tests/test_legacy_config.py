"""Old StoryFi generator configs (`generator: {mode, local, api, custom}`) read as `backends:` lists."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from miner.config import load_config
from miner.errors import ConfigError

# Shaped like the old design's config/generator_config.yaml.example (mode api, Gemini, a local fallback).
LOGGER = "miner.legacy_config"  # named: importing bittensor mutes loggers that exist by then
OLD_EXAMPLE = """
generator:
  mode: "api"
  use_templates: true
  template_dir: "./config/prompts"
  local:
    model_name: "Qwen/Qwen2.5-7B-Instruct"
    device: "cuda"
    quantization: "4bit"
    max_memory: "16GB"
    use_flash_attention: false
  vllm:
    model_name: "meta-llama/Llama-3.1-8B-Instruct"
    tensor_parallel_size: 1
  api:
    provider: "gemini"
    api_key_env: "GEMINI_API_KEY"
    model: "gemini-2.0-flash-exp"
    endpoint: null
  custom:
    script_path: "./custom/example_generate.py"
    endpoint: null
    timeout: 60
    env_vars: {}
"""


def old_file(tmp_path: Path, text: str, name: str = "generator_config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def printed_yaml(caplog) -> str:
    """The new YAML from the one-time log message (between its first line and the notes)."""
    [record] = [r for r in caplog.records if "old StoryFi generator format" in r.getMessage()]
    lines = record.getMessage().splitlines()[1:]
    return "\n".join(line for line in lines if not line.startswith("note: "))


def test_the_old_example_maps_onto_an_ordered_backends_list_printed_once(tmp_path, caplog):
    path = old_file(tmp_path, OLD_EXAMPLE)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = load_config(path)
        again = load_config(path)
    gemini, local = config.backends
    assert (gemini.type, gemini.model, gemini.api_key_env) == ("gemini", "gemini-2.0-flash-exp", "GEMINI_API_KEY")
    assert local.type == "llama_cpp" and local.model_path == "models/qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf"
    assert local.vram_gb is None and local.n_gpu_layers == "auto"
    assert again == config
    message = caplog.text
    assert message.count("old StoryFi generator format") == 1
    assert "storynet-miner download qwen2.5-7b --dir models" in message
    assert "generator.template_dir" in message and "max_memory: dropped" in message
    # What was printed is a config that loads to the same thing.
    assert load_config(old_file(tmp_path, printed_yaml(caplog), "new.yaml")) == config


def test_local_first_with_an_openai_compatible_fallback(tmp_path):
    config = load_config(old_file(tmp_path, """
        generator:
          mode: local
          local: {model_name: meta-llama/Llama-3.1-8B-Instruct, device: cpu}
          api: {provider: custom, api_key_env: ZHIPU_API_KEY, model: glm-4-flash,
                endpoint: "https://open.bigmodel.cn/api/paas/v4"}
    """))
    local, api = config.backends
    assert (local.type, local.n_gpu_layers) == ("llama_cpp", 0)
    assert local.model_path == "models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    assert (api.type, api.model, api.api_key_env, api.base_url) == (
        "openai", "glm-4-flash", "ZHIPU_API_KEY", "https://open.bigmodel.cn/api/paas/v4")


def test_a_custom_script_becomes_a_command_and_the_operator_is_told_what_changed(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = load_config(old_file(tmp_path, """
            generator:
              mode: custom
              custom: {script_path: ./gen.py, timeout: 300, env_vars: {TOKEN: x}}
              api: {provider: openai, model: gpt-4o-mini}
        """))
    custom, api = config.backends
    assert (custom.type, custom.command, custom.timeout_s) == ("custom", ["./gen.py"], 120.0)
    assert (api.type, api.api_key_env) == ("openai", "OPENAI_API_KEY")
    assert "prints {\"text\": ...}" in caplog.text and "generator.custom.env_vars" in caplog.text


def test_a_model_outside_the_catalog_gets_a_convert_command(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = load_config(old_file(tmp_path, """
            generator: {mode: vllm, vllm: {model_name: mistralai/Mistral-7B-Instruct-v0.2}}
        """))
    [local] = config.backends
    assert local.model_path == "models/Mistral-7B-Instruct-v0.2-Q4_K_M.gguf"
    assert ("storynet-miner convert mistralai/Mistral-7B-Instruct-v0.2 --out "
            "models/Mistral-7B-Instruct-v0.2-Q4_K_M.gguf") in caplog.text


@pytest.mark.parametrize("text, words", [
    ("generator: {mode: cloud}", "generator.mode 'cloud' is not one of local, vllm, api, custom"),
    ("generator: {mode: api}\nbackends: [{type: llama_cpp}]", "keep only backends"),
    ("generator: {mode: api, api: {provider: anthropic}}", "generator.api.provider anthropic: not supported"),
    ("generator: {mode: custom, custom: {endpoint: 'http://x/generate'}}", "an HTTP generator has no equivalent"),
])
def test_old_configs_that_cannot_be_mapped_say_why(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(old_file(tmp_path, text))
    assert str(tmp_path) in str(e.value)
