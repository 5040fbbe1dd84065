"""The GPU proof's CPU half: the synthetic model writer, the carry folder, the check's behaviour without a
GPU, and a rehearsal of both device calls' steps on the CPU with only the packages the GPU machine has."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from backends.base import Request
from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from models.embedded import embedded_model_path
from models.synthetic import SCALES, SHAPES, nbytes, tensors, make, random_blocks
from tests.gpu_image import image_packages, python_like_the_gpu_image, wheel_imports

pytestmark = pytest.mark.slow  # llama.cpp runs and a PyPI download

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("synthetic") / "tiny-Q4_K_M.gguf", "tiny", embedded_model_path())


def test_the_tiny_synthetic_model_has_the_shape_asked_for_and_the_tokenizer_copied(tiny):
    reader = gguf.GGUFReader(str(tiny))
    fields = reader.fields
    assert fields["llama.block_count"].contents() == 2 and fields["llama.embedding_length"].contents() == 256
    assert fields["general.name"].contents() == "tiny synthetic (random weights)"
    assert len(fields["tokenizer.ggml.tokens"].data) == 49152
    assert "im_start" in fields["tokenizer.chat_template"].contents()
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_K", "Q6_K", "F32"}  # written in Q4_K_M's types


def test_the_tiny_synthetic_model_loads_and_generates_in_llama_cpp(tiny):
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="tiny", model_path=str(tiny),
                                                             n_ctx=2048, parallel=1))
    try:
        generation = backend.generate(Request(messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                              deadline=time.monotonic() + 30))
        assert generation.completion_tokens > 0
        assert backend.info().name == "tiny synthetic (random weights)"
    finally:
        backend.close()


def test_the_gpu_check_without_a_gpu_says_so_and_exits_non_zero(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "dirname", "mkdir"):  # what the script needs before it looks for a GPU
        (bare / tool).symlink_to(shutil.which(tool))
    out = subprocess.run([str(bare / "bash"), "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": str(bare), "OUT": str(tmp_path / "out")}, timeout=30)
    assert out.returncode == 2
    assert "no NVIDIA GPU here" in out.stderr and "gpu_prepare.sh" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    """.gpu as scripts/gpu_prepare.sh makes it (PyPI: the sdist and the wheels)."""
    folder = tmp_path_factory.mktemp("carry") / ".gpu"
    out = subprocess.run(["bash", "scripts/gpu_prepare.sh", str(folder)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder


def test_gpu_prepare_makes_a_carry_folder_that_fits(carry):
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert size < 56 * 2**20  # beside a working tree of a few MiB, under the 64 MiB a device call carries
    carried = set().union(*(wheel_imports(w) for w in (carry / "wheels").glob("*.whl")))
    assert {"bittensor", "bittensor_wallet", "llguidance", "pydantic"} <= carried
    assert not carried & image_packages()  # only what the image lacks: two versions of one package clash
    (sdist,) = carry.glob("llama-cpp-python-*-slim.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf") for n in names)
    assert any("/ggml/src/ggml-cuda/" in n for n in names) and not any("/ggml-vulkan/" in n for n in names)
    assert not any("/vendor/llama.cpp/docs/" in n or "/.git/" in n for n in names)


def test_the_synthetic_blocks_dequantize_to_small_finite_weights():
    rng = np.random.default_rng(0)
    for kind in SCALES:
        weights = gguf.quants.dequantize(random_blocks(kind, 2000, rng), kind)
        assert np.isfinite(weights).all()
        assert abs(weights.mean()) < 0.005 and 0.01 < weights.std() < 0.03, kind.name


def test_the_8b_file_has_the_tensor_types_and_size_llama_quantize_gives_it():
    """4,912,898,048 bytes of tensors: the real Q4_K_M file is 4,920,733,856 with its tokenizer's metadata."""
    layout = tensors(SHAPES["llama-3.1-8b"], 128256, "Q4_K_M")
    kinds = {name: kind.name for name, _, kind in layout}
    assert kinds["output.weight"] == "Q6_K" and kinds["token_embd.weight"] == "Q4_K"
    assert kinds["blk.0.attn_v.weight"] == "Q6_K" and kinds["blk.5.attn_v.weight"] == "Q4_K"
    assert kinds["blk.31.ffn_down.weight"] == "Q6_K" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert sum(nbytes(dims, kind) for _, dims, kind in layout) == 4_912_898_048


def test_the_gpu_check_steps_rehearse_on_the_cpu_with_only_the_gpu_image_and_the_carry(carry, tmp_path):
    """Both device calls' Python steps with the tiny shape, where only what the GPU machine would have
    imports (tests/gpu_image.py): a package the carry lacks fails here, not on the card."""
    python, env = python_like_the_gpu_image(tmp_path / "image", carry / "wheels")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()

    def step(*argv: str, timeout: float) -> None:
        run = subprocess.run([str(python), "scripts/gpu_check.py", *argv, "--work", str(work), "--out", str(out)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, run.stderr[-3000:]

    step("model", "--shape", "tiny", "--vocab", str(embedded_model_path()), timeout=120)
    step("prove", timeout=300)
    tiny_plan = "--n-ctx 4096 --parallel 2"
    step("measure", "--seconds", "150", "--loadtest-seconds", "5", "--validators", "2", "--plans", "6", "--loadtest",
         "--others 1 --api 0", "--bench", "--tasks blueprint --repeat 1 --batch-task blueprint --batch-requests 2 "
         f"--burst 0 --bare-steps 10 --step-cells 600 --no-engine-process {tiny_plan}", "--burst", "--tasks '' --batch-requests 0 "
         f"--bare-steps 0 --step-cells 0 --burst 2 --burst-rounds 2 {tiny_plan}", timeout=300)
    steps = {s["step"]: s for s in json.loads((out / "gpu_check.json").read_text())}
    assert list(steps) == ["write model", "build", "fit", "load and answer", "clock", "engine restart", "bench",
                           "burst", "validators' step, 6 GiB plan"]
    assert not steps["build"]["ok"]  # no GPU offload in the CPU build, and it says so
    assert steps["fit"]["ok"] and steps["load and answer"]["ok"], steps
    assert "1 at once: learned" in steps["clock"]["summary"] and "answers ran at" in steps["clock"]["summary"]
    assert steps["engine restart"]["ok"] and "serving again" in steps["engine restart"]["summary"], steps
    assert "the llama.cpp engine process was killed by signal 9" in steps["engine restart"]["error"]
    assert steps["bench"]["ok"] and "x raw" in steps["bench"]["summary"], steps["bench"]
    def sections(name: str) -> set[str]:
        return {json.loads(line)["section"] for line in (out / f"{name}_rows.jsonl").read_text().splitlines()}

    assert sections("bench") == {"setup", "task", "batching", "steps"} and sections("burst") == {"setup", "burst"}
    assert steps["burst"]["ok"] and "sharing on" in steps["burst"]["summary"]
    assert len(list(out.iterdir())) <= 8  # what a device call brings back
    assert "2 validators" in steps["validators' step, 6 GiB plan"]["summary"], steps
    assert "| bench | yes |" in (out / "gpu_check.md").read_text()
