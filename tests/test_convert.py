"""HF -> GGUF conversion checked against transformers on tiny random checkpoints built here.

Each checkpoint has a random model (widths of 256 so Q4_K_M applies) and a tokenizer like the real one:
Llama-3's and Qwen2's own byte-level BPE vocabularies (rebuilt from llama.cpp's test files,
tests/real_tokenizers.py), and SentencePiece models trained on a small corpus for Mixtral and for a
Llama-2-style llama (tokenizer.json and tokenizer.model). llama.cpp must reproduce transformers' logits
and tokenization; what the converter cannot write faithfully must be refused with an error naming the file.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from models.hf_to_gguf import ConversionError, convert
from models.quantize import quantize
from tests.real_tokenizers import LLAMA3_SPLIT, VOCABS, rebuild, reference_cases

pytestmark = pytest.mark.slow  # torch and real conversions

REPO = Path(__file__).resolve().parent.parent
CORPUS = [
    "Hello world, it's a fine day in 2024! We'll see what they've done.",
    "Ça va très bien, merci. Une naïve crème brûlée au café, s'il vous plaît.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog 1234567 times.",
    "def main(argv=None):\n    return 0\n\n\tTabs,  double  spaces and #$%&*() symbols.",
] * 30
TEXTS = [
    "Hello world, it's 2024!",
    "Ça va très bien, naïve café, Äpfel und Öl",
    "你好，世界。今天天气很好",
    "two  spaces\nnew line\ttab 1234567",
    "\n\n\tblank lines, trailing spaces \n   ",
]
# transformers' port of a SentencePiece tokenizer merges leading spaces that SentencePiece keeps.
LEADING_SPACES = "   three leading spaces"
PROMPT = "Hello world, the quick brown fox said: ça va? 你好世界 1234"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# A short original context puts most frequencies in the scaled or blended band.
LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})
TOLERANCES = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2}  # outtype -> max |logit diff| / max |logit|
VOCAB_FILES = [f"models/ggml-vocab-{name}.gguf{suffix}" for name in VOCABS for suffix in ("", ".inp", ".out")]


@dataclass(frozen=True)
class Fixture:
    """A saved checkpoint and the live transformers objects it was saved from."""

    path: Path
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase


Checkpoints = dict[str, Fixture]
Converted = Callable[..., Path]  # (name, outtype="f32", quant="none") -> the converted file
MakeTokenizer = Callable[[Path, dict[str, Path]], transformers.PreTrainedTokenizerBase]
# (work folder, llama.cpp's vocabulary files, the checkpoints built before) -> a saved checkpoint
Builder = Callable[[Path, dict[str, Path], Checkpoints], Fixture]


def trained_byte_level_bpe(work: Path, _: dict[str, Path]) -> transformers.PreTrainedTokenizerBase:
    """Shaped like Llama-3's but trained here: its tokens differ, so no converter can know its pre-tokenizer."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>", chat_template=CHAT_TEMPLATE)


def trained_sentencepiece(work: Path, _: dict[str, Path]) -> transformers.PreTrainedTokenizerBase:
    # Llama-2/Mixtral trainer settings: BPE pieces, byte fallback, digits split, no normalization.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(work / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    tokenizer = transformers.LlamaTokenizer.from_pretrained(work, add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def real_tokenizer(name: str) -> MakeTokenizer:
    return lambda _, vocab_files: rebuild(vocab_files[name], CHAT_TEMPLATE)


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that attention is far from uniform, so a wrong q/k layout shows in logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)


def recipe(config_cls: type[transformers.PretrainedConfig], model_cls: type[transformers.PreTrainedModel],
           make_tokenizer: MakeTokenizer, extra: dict, padded_vocab: int = 0,
           keep_tokenizer_model: bool = False) -> Builder:
    """A random model of config_cls and its tokenizer, saved as save_pretrained() saves them.

    padded_vocab: embedding rows past the tokenizer's, as some real checkpoints have.
    keep_tokenizer_model: ship the SentencePiece tokenizer.model beside tokenizer.json.
    """
    def build(work: Path, vocab_files: dict[str, Path], _: Checkpoints) -> Fixture:
        tokenizer = make_tokenizer(work, vocab_files)
        specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        config = config_cls(vocab_size=len(tokenizer) + padded_vocab, **COMMON, **extra, **specials)
        torch.manual_seed(0)
        model = model_cls(config).eval()
        randomize(model)
        model.save_pretrained(work / "checkpoint")
        tokenizer.save_pretrained(work / "checkpoint")
        if keep_tokenizer_model:
            shutil.copy(work / "tokenizer.model", work / "checkpoint" / "tokenizer.model")
        return Fixture(work / "checkpoint", model, tokenizer)

    return build


def as_transformers_4_saved_it(build: Builder) -> Builder:
    """The checkpoint with torch .bin weights and rope_theta and rope_scaling apart in config.json, as
    transformers 4 saved Llama-2 and Llama-3.1 (and the hub still holds them)."""
    def resave(work: Path, vocab_files: dict[str, Path], built: Checkpoints) -> Fixture:
        fixture = build(work, vocab_files, built)
        (fixture.path / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in fixture.model.state_dict().items()},
                   fixture.path / "pytorch_model.bin")
        config_path = fixture.path / "config.json"
        config = json.loads(config_path.read_text())
        rope = config.pop("rope_parameters")
        config |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
        config_path.write_text(json.dumps(config))
        return fixture

    return resave


def opt(work: Path, _: dict[str, Path], built: Checkpoints) -> Fixture:
    """A real architecture that llama.cpp does not run."""
    config = transformers.OPTConfig(vocab_size=420, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                    num_attention_heads=2, word_embed_proj_dim=64)
    model = transformers.OPTForCausalLM(config).eval()
    tokenizer = built["llama-unknown-bpe"].tokenizer
    model.save_pretrained(work / "checkpoint")
    tokenizer.save_pretrained(work / "checkpoint")
    return Fixture(work / "checkpoint", model, tokenizer)


# Built in this order; each may use those before it.
BUILDERS: dict[str, Builder] = {
    # Llama-3.2 and Qwen2.5 as released: their own tokenizers, Qwen2's vocab_size padded past its tokens.
    "llama": recipe(transformers.LlamaConfig, transformers.LlamaForCausalLM, real_tokenizer("llama-bpe"),
                    dict(LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2": recipe(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, real_tokenizer("qwen2"),
                    dict(rope_theta=1000000.0, tie_word_embeddings=True), padded_vocab=290),
    "mixtral": recipe(transformers.MixtralConfig, transformers.MixtralForCausalLM, trained_sentencepiece,
                      dict(num_local_experts=4, num_experts_per_tok=2), padded_vocab=4, keep_tokenizer_model=True),
    # Llama-2 as released: tokenizer.json is a SentencePiece vocabulary ("BPE" with byte fallback).
    "llama-spm": as_transformers_4_saved_it(recipe(
        transformers.LlamaConfig, transformers.LlamaForCausalLM, trained_sentencepiece,
        dict(LLAMA3_ROPE, tie_word_embeddings=False), keep_tokenizer_model=True)),
    "llama-unknown-bpe": recipe(transformers.LlamaConfig, transformers.LlamaForCausalLM, trained_byte_level_bpe,
                                dict(tie_word_embeddings=True)),
    "opt": opt,
}
ARCHS = ["llama", "qwen2", "mixtral"]
# Converted in every run, in this order, as soon as each checkpoint is saved. A conversion is a process
# that spends 4 s importing torch and transformers (about 12 s in all with a real vocabulary): they run
# in the background, two at a time, while the tests read the files already written.
UP_FRONT = [("llama", "f32"), ("qwen2", "f32"), ("mixtral", "f32"), ("llama-spm", "f32"), ("opt", "f16")]


class Bench:
    """The checkpoints, and their conversions running or done."""

    def __init__(self, root: Path, vocab_files: dict[str, Path]) -> None:
        self.out = root / "gguf"
        self.out.mkdir()
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.checkpoints: Checkpoints = {}
        self.conversions: dict[tuple[str, str], Future[Path]] = {}
        self.quantized: dict[tuple[str, str], Path] = {}
        for name, builder in BUILDERS.items():
            (root / name).mkdir()
            self.checkpoints[name] = builder(root / name, vocab_files, self.checkpoints)
            for outtype in [o for n, o in UP_FRONT if n == name]:
                self.start(name, outtype)
        # The command line's default path (f16, then Q4_K_M), and a refusal; each in a folder of its own.
        self.cli: dict[str, tuple[Path, Future[subprocess.CompletedProcess[str]]]] = {}
        for name, args in (("llama-spm", ["--out", "model.gguf", "--json"]), ("llama-unknown-bpe", [])):
            (root / f"cli-{name}").mkdir()
            self.cli[name] = (root / f"cli-{name}", self.pool.submit(
                run_cli, [str(self.checkpoints[name].path), *args], root / f"cli-{name}"))

    def start(self, name: str, outtype: str) -> None:
        path, out = self.checkpoints[name].path, self.out / f"{name}-{outtype}.gguf"
        self.conversions[(name, outtype)] = self.pool.submit(
            lambda: convert(path, quant="none", outtype=outtype, out=out).path)

    def converted(self, name: str, outtype: str = "f32", quant: str = "none") -> Path:
        """The file converted to outtype, or quantized from it; raises what the conversion raised."""
        if (name, outtype) not in self.conversions:
            self.start(name, outtype)
        plain = self.conversions[(name, outtype)].result()
        if quant == "none":
            return plain
        if (name, quant) not in self.quantized:
            self.quantized[(name, quant)] = self.out / f"{name}-{quant}.gguf"
            quantize(plain, self.quantized[(name, quant)], quant)
        return self.quantized[(name, quant)]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "miner", "convert", *args],
                          check=False, capture_output=True, text=True, cwd=cwd, timeout=300)


def hf_logits(fixture: Fixture, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return fixture.model(torch.tensor([tokens])).logits[0].float().numpy()


def cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    # An F32 KV cache, so that the F32 comparison measures the conversion and not cache rounding.
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)])
    llm.close()
    return scores


def relative_diff(path: Path, fixture: Fixture) -> tuple[float, np.ndarray, np.ndarray]:
    tokens = fixture.tokenizer(PROMPT)["input_ids"]
    expected, got = hf_logits(fixture, tokens), cpp_logits(path, tokens)
    return float(np.abs(expected - got).max() / np.abs(expected).max()), expected, got


@functools.cache  # loading a real vocabulary takes a second
def cpp_tokenizer(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("arch, vocab", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_rebuilt_tokenizers_give_llama_cpps_reference_tokens(arch: str, vocab: str, vocab_files: dict[str, Path],
                                                             checkpoints: Checkpoints) -> None:
    """The checkpoints' Llama-3 and Qwen2 tokenizers are the real ones, else the parity below means less."""
    for text, ids in reference_cases(vocab_files[vocab]):
        assert checkpoints[arch].tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text


@pytest.mark.parametrize("name, outtype", [
    *[(name, "f32") for name in [*ARCHS, "llama-spm"]],
    # The 16-bit types add a conversion each (about 12 s with a real vocabulary): asked for with -m long.
    *[pytest.param(name, outtype, marks=pytest.mark.long)
      for name in [*ARCHS, "llama-spm"] for outtype in ("f16", "bf16")],
])
def test_logits_match_transformers(name: str, outtype: str, checkpoints: Checkpoints, converted: Converted) -> None:
    diff, expected, got = relative_diff(converted(name, outtype), checkpoints[name])
    print(f"{name} {outtype}: max |logit diff| / max |logit| = {diff:.2e}")
    assert diff < TOLERANCES[outtype]
    assert (expected.argmax(-1) == got.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ["llama-spm", "qwen2", "mixtral"])
def test_q8_0_keeps_the_top_token(arch: str, checkpoints: Checkpoints, converted: Converted) -> None:
    # Random weights this large make the net chaotic (and MoE routing flips), so only the top token is
    # compared; it still fails when a tensor is mangled (about half the positions then disagree).
    diff, expected, got = relative_diff(converted(arch, "f32", "Q8_0"), checkpoints[arch])
    agreement = (expected.argmax(-1) == got.argmax(-1)).mean()
    print(f"{arch} Q8_0: max |logit diff| / max |logit| = {diff:.2e}, top-1 agreement {agreement:.2f}")
    assert agreement >= 0.8


@pytest.mark.parametrize("arch, texts", [
    ("llama", [*TEXTS, LEADING_SPACES]), ("qwen2", [*TEXTS, LEADING_SPACES]), ("mixtral", TEXTS),
    ("llama-spm", TEXTS)])
def test_tokenization_matches_transformers(arch: str, texts: list[str], checkpoints: Checkpoints,
                                           converted: Converted) -> None:
    llm = cpp_tokenizer(converted(arch))
    tokenizer = checkpoints[arch].tokenizer
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("arch, vocab", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_tokenization_matches_llama_cpps_reference(arch: str, vocab: str, vocab_files: dict[str, Path],
                                                   converted: Converted) -> None:
    llm = cpp_tokenizer(converted(arch))
    for text, ids in reference_cases(vocab_files[vocab]):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text


@pytest.mark.parametrize("arch", ["mixtral", "llama-spm"])
def test_sentencepiece_tokenization_matches_the_model_file(arch: str, checkpoints: Checkpoints,
                                                           converted: Converted) -> None:
    """tokenizer.model is what Mixtral and Llama-2 convert from; unlike transformers' port of it, it also
    keeps every space of leading whitespace."""
    llm = cpp_tokenizer(converted(arch))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoints[arch].path / "tokenizer.model"))
    for text in [*TEXTS, LEADING_SPACES]:
        assert llm.tokenize(text.encode(), add_bos=True) == [processor.bos_id(), *processor.encode(text)], text


@pytest.mark.parametrize("arch, pre, add_bos", [
    ("llama", "llama-bpe", True), ("qwen2", "qwen2", False), ("mixtral", "default", True),
    ("llama-spm", "default", True)])
def test_special_tokens_and_chat_template_are_kept(arch: str, pre: str, add_bos: bool, checkpoints: Checkpoints,
                                                   converted: Converted) -> None:
    meta = cpp_tokenizer(converted(arch)).metadata
    tokenizer = checkpoints[arch].tokenizer
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.pre"] == pre
    assert meta.get("tokenizer.ggml.add_bos_token", "false") == str(add_bos).lower()
    if tokenizer.pad_token is not None:
        assert int(meta["tokenizer.ggml.padding_token_id"]) == tokenizer.pad_token_id


def test_a_llama_with_a_sentencepiece_tokenizer_json_gets_a_sentencepiece_vocabulary(converted: Converted) -> None:
    """Llama-2's tokenizer.json is a "BPE" model too, but with byte fallback and SentencePiece's spaces:
    written as byte-level BPE it would load and generate, and tokenize differently."""
    meta = cpp_tokenizer(converted("llama-spm")).metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")


def test_a_sentencepiece_tokenizer_json_without_its_model_file_is_refused(checkpoints: Checkpoints,
                                                                          tmp_path: Path) -> None:
    """From tokenizer.json alone llama.cpp's converter gives every piece the same score; llama.cpp then
    split "two  spaces\nnew line" differently from the tokenizer."""
    shutil.copytree(checkpoints["llama-spm"].path, tmp_path / "ckpt", ignore=shutil.ignore_patterns("tokenizer.model"))
    with pytest.raises(ConversionError, match=f"{tmp_path / 'ckpt' / 'tokenizer.json'} holds a SentencePiece "
                                              "tokenizer .* lacks its tokenizer.model"):
        convert(tmp_path / "ckpt", out=tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama-spm", "mixtral"])
def test_q4_files_load_and_generate(arch: str, quant: str, converted: Converted) -> None:
    path = converted(arch, "f32", quant)
    assert path.stat().st_size < converted(arch).stat().st_size / 4
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion("Hello world", max_tokens=5, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()


def test_unrecognised_bpe_tokenizer_is_refused(checkpoints: Checkpoints, convert_bench: Bench) -> None:
    folder, run = convert_bench.cli["llama-unknown-bpe"]
    assert (run.result().returncode, run.result().stdout) == (2, "")  # could not do it: the message says why
    tokenizer_json = checkpoints["llama-unknown-bpe"].path / "tokenizer.json"
    assert f"{tokenizer_json}: llama.cpp's converter in llama-cpp-python" in run.result().stderr
    assert "does not recognise this BPE tokenizer's pre-tokenizer" in run.result().stderr
    assert not list(folder.iterdir())  # not even a .part file


def test_unsupported_architecture_is_refused(checkpoints: Checkpoints, convert_bench: Bench) -> None:
    config_json = checkpoints["opt"].path / "config.json"
    with pytest.raises(ConversionError, match=rf"{config_json}: .*does not support the architecture "
                                              r"OPTForCausalLM\. A newer llama-cpp-python"):
        convert_bench.converted("opt", "f16")
    assert not list(convert_bench.out.glob("opt*"))


def test_missing_tokenizer_is_a_clear_error(checkpoints: Checkpoints, tmp_path: Path) -> None:
    shutil.copytree(checkpoints["llama-spm"].path, tmp_path / "ckpt", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ConversionError, match=rf"{tmp_path / 'ckpt'} holds no tokenizer \(tokenizer.json, "
                                              r"tokenizer.model, vocab.json\).*tokenizer.save_pretrained"):
        convert(tmp_path / "ckpt", out=tmp_path / "out.gguf")


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConversionError, match=f"{missing} is not a checkpoint directory"):
        convert(missing)


def test_not_enough_disk_is_found_before_converting(tmp_path: Path) -> None:
    """The plan counts the converter's f16 file and the quantized one, which exist together for a while."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16"}))
    (ckpt / "tokenizer.model").touch()
    with open(ckpt / "model.safetensors", "wb") as weights:
        weights.truncate(4 * 10**12)  # sparse: 2 T bf16 weights, 5.24 TB of f16 and Q4_K_M
    with pytest.raises(ConversionError, match=rf"not enough free space for {tmp_path / 'out.gguf'}: "
                                              r"about 4880\.13 GiB needed.*pass --out on a larger disk"):
        convert(ckpt, out=tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_converts_to_q4_k_m_and_prints_json(convert_bench: Bench) -> None:
    folder, future = convert_bench.cli["llama-spm"]
    run, out = future.result(), folder / "model.gguf"
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"path": "model.gguf", "arch": "llama", "outtype": "f16", "quant": "Q4_K_M",
                                      "bytes": out.stat().st_size}
    assert sorted(p.name for p in folder.iterdir()) == ["model.gguf"]  # no .part files left behind
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    assert llm.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    assert llm.create_completion("Hello world", max_tokens=5, temperature=0.0)["usage"]["completion_tokens"] >= 1
    llm.close()
