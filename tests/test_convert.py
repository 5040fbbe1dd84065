"""HF -> GGUF conversion checked against transformers on tiny random checkpoints built here.

Each architecture gets a random model (widths of 256 so Q4_K_M applies) and a tokenizer trained on a
small corpus in the test, shaped like the real one (Llama-3 and Qwen2 byte-level BPE, Mixtral
SentencePiece). llama.cpp must reproduce transformers' logits and tokenization.
"""

from __future__ import annotations

# llama_cpp before numpy and torch: the other order made llama.cpp crash on the GPU machine.
import llama_cpp  # isort: skip

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from models.convert import ConversionError, convert, ensure_space
from scripts.convert_model import main

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
    "Ça va très bien, naïve café",
    "你好，世界。今天天气很好",
    "two  spaces\nnew line\ttab 1234567",
]
PROMPT = "Hello world, the quick brown fox said: ça va? 你好世界 1234"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class Fixture:
    """A saved checkpoint and the live transformers objects it was saved from."""

    path: Path
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase


Checkpoints = dict[str, Fixture]
Converted = Callable[..., Path]  # (arch, outtype="f32", quant="none") -> the converted file


def byte_level_bpe(split: str, specials: list[str], bos: str | None, ignore_merges: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def llama3_tokenizer(_: Path) -> transformers.PreTrainedTokenizerBase:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = byte_level_bpe(LLAMA3_SPLIT, specials, "<|begin_of_text|>", ignore_merges=True)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>", chat_template=CHAT_TEMPLATE)


def qwen2_tokenizer(_: Path) -> transformers.PreTrainedTokenizerBase:
    tok = byte_level_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ignore_merges=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def mixtral_tokenizer(work: Path) -> transformers.PreTrainedTokenizerBase:
    # Llama-2/Mixtral trainer settings: BPE pieces, byte fallback, digits split, no normalization.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(work / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    tokenizer = transformers.LlamaTokenizer.from_pretrained(work, add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, llama3_tokenizer, dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        # A short original context puts most frequencies in the scaled or blended band.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, qwen2_tokenizer, dict(
        rope_theta=1000000.0, tie_word_embeddings=True)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, mixtral_tokenizer, dict(
        num_local_experts=4, num_experts_per_tok=2)),
}


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that attention is far from uniform, so a wrong q/k layout shows in logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)


def build(arch: str, work: Path) -> Fixture:
    config_cls, model_cls, make_tokenizer, extra = ARCHS[arch]
    work.mkdir(parents=True)
    tokenizer = make_tokenizer(work)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    # A few ids past the tokenizer's, as real checkpoints pad vocab_size.
    config = config_cls(vocab_size=len(tokenizer) + 4, **COMMON, **extra, **specials)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model)
    path = work / "checkpoint"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if (work / "tokenizer.model").exists():
        shutil.copy(work / "tokenizer.model", path / "tokenizer.model")
    return Fixture(path, model, tokenizer)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    root = tmp_path_factory.mktemp("hf")
    return {arch: build(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def converted(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """convert() once per (arch, outtype, quant); the tests share the files."""
    out = tmp_path_factory.mktemp("gguf")
    done: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, outtype: str = "f32", quant: str = "none") -> Path:
        key = (arch, outtype, quant)
        if key not in done:
            done[key] = convert(checkpoints[arch].path, quant=quant, outtype=outtype,
                                out=out / f"{arch}-{outtype}-{quant}.gguf").path
        return done[key]

    return get


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


@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-4), ("f16", 1e-2), ("bf16", 6e-2)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(arch: str, outtype: str, tolerance: float, checkpoints: Checkpoints,
                                   converted: Converted) -> None:
    diff, expected, got = relative_diff(converted(arch, outtype), checkpoints[arch])
    print(f"{arch} {outtype}: max |logit diff| / max |logit| = {diff:.2e}")
    assert diff < tolerance
    assert (expected.argmax(-1) == got.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", list(ARCHS))
def test_q8_0_keeps_the_top_token(arch: str, checkpoints: Checkpoints, converted: Converted) -> None:
    # Random weights this large make the net chaotic (and MoE routing flips), so only the top token is
    # compared; it still fails when a tensor is mangled (about half the positions then disagree).
    _, expected, got = relative_diff(converted(arch, "f16", "Q8_0"), checkpoints[arch])
    agreement = (expected.argmax(-1) == got.argmax(-1)).mean()
    print(f"{arch} Q8_0: top-1 agreement {agreement:.2f}")
    assert agreement >= 0.8


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tokenization_matches_transformers(arch: str, checkpoints: Checkpoints, converted: Converted) -> None:
    llm = llama_cpp.Llama(str(converted(arch)), vocab_only=True, verbose=False)
    tokenizer = checkpoints[arch].tokenizer
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text)["input_ids"], text


def test_sentencepiece_tokenization_matches_the_model_file(checkpoints: Checkpoints, converted: Converted) -> None:
    """tokenizer.model is what Mixtral converts from; unlike transformers' port of it, it also keeps
    every space of leading whitespace."""
    llm = llama_cpp.Llama(str(converted("mixtral")), vocab_only=True, verbose=False)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoints["mixtral"].path / "tokenizer.model"))
    for text in [*TEXTS, "  two leading spaces"]:
        assert llm.tokenize(text.encode(), add_bos=True) == [processor.bos_id(), *processor.encode(text)], text


@pytest.mark.parametrize("arch", list(ARCHS))
def test_special_tokens_and_chat_template_are_kept(arch: str, checkpoints: Checkpoints, converted: Converted) -> None:
    meta = llama_cpp.Llama(str(converted(arch)), vocab_only=True, verbose=False).metadata
    tokenizer = checkpoints[arch].tokenizer
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id
    expected = {"llama": ("llama-bpe", "true"), "qwen2": ("qwen2", "false"), "mixtral": ("default", "true")}[arch]
    assert (meta["tokenizer.ggml.pre"], meta.get("tokenizer.ggml.add_bos_token", "false")) == expected
    if tokenizer.pad_token is not None:
        assert int(meta["tokenizer.ggml.padding_token_id"]) == tokenizer.pad_token_id


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_q4_files_load_and_generate(arch: str, quant: str, checkpoints: Checkpoints, converted: Converted) -> None:
    path = converted(arch, "f16", quant)
    assert path.stat().st_size < converted(arch, "f16").stat().st_size / 2.5
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion("Hello world", max_tokens=5, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()


def resaved(fixture: Fixture, dest: Path, weights: str, save: Callable[[dict, Path], None]) -> Fixture:
    """The same model and tokenizer in another on-disk layout."""
    shutil.copytree(fixture.path, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    save({k: v.contiguous() for k, v in fixture.model.state_dict().items()}, dest / weights)
    return Fixture(dest, fixture.model, fixture.tokenizer)


@pytest.mark.parametrize("arch, weights, save", [
    ("llama", "pytorch_model.bin", torch.save),
    # transformers 5 keeps mixtral experts fused in memory; a raw state_dict saves them that way.
    ("mixtral", "model.safetensors", save_file),
])
def test_other_weight_layouts(arch: str, weights: str, save: Callable[[dict, Path], None],
                              checkpoints: Checkpoints, tmp_path: Path) -> None:
    fixture = resaved(checkpoints[arch], tmp_path / "ckpt", weights, save)
    result = convert(fixture.path, quant="none", outtype="f32", out=tmp_path / "out.gguf")
    assert relative_diff(result.path, fixture)[0] < 1e-4


def test_transformers_4_rope_config(checkpoints: Checkpoints, tmp_path: Path) -> None:
    """Hub checkpoints of Llama-3.1 keep rope_theta and rope_scaling apart, as transformers 4 wrote them."""
    fixture = checkpoints["llama"]
    shutil.copytree(fixture.path, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    config_path.write_text(json.dumps(config))
    result = convert(tmp_path / "ckpt", quant="none", outtype="f32", out=tmp_path / "out.gguf")
    assert relative_diff(result.path, Fixture(tmp_path / "ckpt", fixture.model, fixture.tokenizer))[0] < 1e-4


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match=r"'gpt2' \(GPT2LMHeadModel\).*supported: llama, mixtral, qwen2"):
        convert(tmp_path, out=tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConversionError, match=f"{missing} is not a checkpoint directory"):
        convert(missing)
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_model.py"), str(missing)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (run.returncode, run.stdout) == (1, "")
    assert f"{missing} is not a checkpoint directory" in run.stderr


def test_not_enough_space_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=f"not enough free space for {tmp_path / 'x.gguf'}.*--out"):
        ensure_space(tmp_path / "x.gguf", 2**62)


def test_cli_prints_json_on_stdout(checkpoints: Checkpoints, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.gguf"
    assert main([str(checkpoints["qwen2"].path), "--quant", "Q8_0", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["quant"] == "Q8_0" and report["arch"] == "qwen2"
    assert report["bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no .part files left behind
