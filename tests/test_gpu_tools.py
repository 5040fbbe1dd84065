"""The GPU proof's CPU half: the synthetic model writer at a tiny shape, the carry folder, and the check's
behaviour without a GPU. The test marked long rehearses the check's Python steps end to end on the CPU."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gguf
import pytest

from backends.base import Request
from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from models.embedded import embedded_model_path
from models.synthetic import make

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
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in kinds and not tiny.with_name(tiny.name + ".f16").exists()  # quantized, F16 removed


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


def test_gpu_prepare_makes_a_carry_folder_that_fits(tmp_path):
    folder = tmp_path / ".gpu"
    out = subprocess.run(["bash", "scripts/gpu_prepare.sh", str(folder)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 56 * 2**20  # beside a working tree of a few MiB, under the 64 MiB a device call carries
    wheels = {p.name.split("-")[0].lower() for p in (folder / "wheels").glob("*.whl")}
    assert wheels == {"llguidance", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gguf",
                      "diskcache"}
    (sdist,) = folder.glob("llama-cpp-python-*-slim.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf") for n in names)
    assert any("/ggml/src/ggml-cuda/" in n for n in names) and not any("/ggml-vulkan/" in n for n in names)
    assert not any("/vendor/llama.cpp/docs/" in n for n in names)


@pytest.mark.slow
@pytest.mark.long
def test_the_gpu_check_steps_rehearse_on_the_cpu(tmp_path):
    """gpu_check.py's steps with the tiny shape: what the device call will run, less the CUDA build."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    script = [sys.executable, "scripts/gpu_check.py"]
    subprocess.run([*script, "f16", "--shape", "tiny", "--vocab", str(embedded_model_path()), "--work", str(work),
                    "--out", str(out)], cwd=ROOT, check=True, timeout=120)
    subprocess.run([*script, "rest", "--work", str(work), "--out", str(out)], cwd=ROOT, check=True, timeout=900)
    steps = {s["step"]: s for s in json.loads((out / "gpu_check.json").read_text())}
    assert list(steps) == ["write F16", "build", "quantize", "fit", "load and answer", "bench"]
    assert not steps["build"]["ok"]  # no GPU offload in the CPU build, and it says so
    assert all(steps[s]["ok"] for s in ("quantize", "fit", "load and answer", "bench")), steps
    assert "| bench | yes |" in (out / "gpu_check.md").read_text()
