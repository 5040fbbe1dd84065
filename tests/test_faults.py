"""Faults while serving, each injected into real parts: the model file going away, a backend failing in the
middle of an answer, CUDA running out of memory at load, and SIGTERM with requests in flight (the engine
process gone with the miner). Nothing is lost: every request gets a valid answer from some backend, or an
explicit error, before its hard limit. The engine process's own faults are test_supervisor.py's."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import bittensor as bt
import pytest
import yaml

from backends import llama_cpp
from backends import llama_lowlevel as ll
from backends.base import BackendError, Request
from backends.chain import BackendState, Chain
from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from miner.contract import answer_of
from miner import examples
from miner.config import ChainSettings, GenerationSettings
from miner.demo import free_port, make_wallet
from miner.neuron import no_public_ip_lookup
from miner.protocol import StoryGenerationSynapse
from miner.service import StoryService
from miner.tasks import TASKS, Context
from models.embedded import embedded_model_path
from tests.fakes import RefusesAfter

pytestmark = pytest.mark.slow  # each loads a real model or starts a real miner

ROOT = Path(__file__).resolve().parents[1]


def say_hi(seconds: float = 30) -> Request:
    return Request(messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
                   deadline=time.monotonic() + seconds)


def small(path: Path, **kw) -> LlamaCppSettings:
    return LlamaCppSettings(type="llama_cpp", name="local", model_path=str(path), n_ctx=2048, parallel=1, **kw)


def test_a_model_file_deleted_or_replaced_after_start_keeps_serving_and_health_says_so(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(embedded_model_path(), path)
    backend = LlamaCppBackend.from_settings(small(path))
    try:
        path.unlink()
        assert backend.generate(say_hi()).completion_tokens > 0
        health = backend.health()
        assert health.ok and str(path) in health.detail and "gone since it was loaded" in health.detail
        assert "next start will fail" in health.detail

        shutil.copyfile(embedded_model_path(), tmp_path / "new.gguf")
        os.replace(tmp_path / "new.gguf", path)  # how downloads land: a new file renamed over the old
        health = backend.health()
        assert health.ok and "was replaced since it was loaded" in health.detail and "restart" in health.detail

        with path.open("r+b") as f:  # overwritten in place (cp over it): a mapped model would die of SIGBUS
            f.truncate(0)
            f.write(b"GGUF" + b"\0" * 1000)
        assert backend.generate(say_hi()).completion_tokens > 0
    finally:
        backend.close()


def test_a_backend_failing_mid_answer_costs_no_answer(embedded_backend, writer, monkeypatch):
    """Two validators ask at once; the local model's answer to one fails part-way through. That one is
    answered by the next backend, the other by the local model, both within the contract."""
    real_matcher = embedded_backend.engine.vocab.matcher
    failed = []

    def matcher(schema):
        inner = real_matcher(schema)
        if failed:
            return inner
        failed.append(True)
        return RefusesAfter(inner, 12)

    monkeypatch.setattr(embedded_backend.engine.vocab, "matcher", matcher)
    writer_state = Chain.from_config([writer], ChainSettings()).states[0]
    chain = Chain([BackendState(embedded_backend, "local"), writer_state])
    service = StoryService(chain, GenerationSettings(target_s=8))  # sized small: the failure is the point
    answers = [None, None]

    def ask(i: int) -> None:  # a long timeout: a CPU shared with other work must not make the model refuse
        answers[i] = service.answer(examples.validator_fields("blueprint", examples.VALIDATOR_PROMPTS[i]),
                                    timeout_s=180)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert failed and all(a is not None and a.ok for a in answers), [a and a.output for a in answers]
    modes = sorted(a.output["model_info"]["mode"] for a in answers)
    assert modes[0] == "custom"  # the answer that failed part-way came from the next backend
    for a in answers:
        TASKS["blueprint"].check(answer_of(a.output), Context(user_input="x"))
        assert a.seconds < 175  # by its hard limit (timeout_s 180 less the 5 s margin)
    assert "injected" in chain.states[0].last_error
    assert embedded_backend.engine.alive() and embedded_backend.generate(say_hi()).completion_tokens > 0


def test_cuda_out_of_memory_at_load_retries_with_fewer_layers(monkeypatch, caplog):
    """Loading fails for more than 10 GPU layers, as a too-optimistic VRAM plan would on a real card."""
    tried = []

    class TightGPU(ll.Model):
        def __init__(self, path: Path, n_gpu_layers: int, **kw):
            tried.append(n_gpu_layers)
            if n_gpu_layers > 10 or n_gpu_layers < 0:
                raise ll.LlamaError("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 812.00 MiB on device "
                                    "0: cudaMalloc failed: out of memory")
            super().__init__(path, n_gpu_layers, **kw)

    monkeypatch.setattr(llama_cpp.ll, "Model", TightGPU)
    backend = LlamaCppBackend.from_settings(small(embedded_model_path(), vram_gb=6))
    try:
        assert tried[0] > 10 and tried == sorted(tried, reverse=True) and len(set(tried)) == len(tried)
        assert backend.plan.n_gpu_layers == tried[-1] <= 10
        assert backend.info().parameters["n_gpu_layers"] == tried[-1]
        assert "out of memory" in caplog.text and "retrying with" in caplog.text
        assert backend.generate(say_hi()).completion_tokens > 0
    finally:
        backend.close()


def test_out_of_memory_even_on_the_cpu_is_a_clear_error(monkeypatch):
    class NoMemory(ll.Model):
        def __init__(self, path: Path, n_gpu_layers: int, **kw):
            raise ll.LlamaError("cudaMalloc failed: out of memory")

    monkeypatch.setattr(llama_cpp.ll, "Model", NoMemory)
    with pytest.raises(BackendError, match="out of memory.*re-download it, or get one with"):
        LlamaCppBackend.from_settings(small(embedded_model_path(), vram_gb=6))


# ---- SIGTERM with requests in flight -------------------------------------------------------------------

def start_miner(tmp_path: Path, grace_s: float, validator_hotkey: str) -> tuple[subprocess.Popen, bt.AxonInfo, int]:
    """`run --offline` serving the validator; returns it, its axon and its llama.cpp engine process's pid."""
    port = free_port()
    miner_wallet = make_wallet(str(tmp_path), "miner")
    config = {"wallet": {"name": "miner", "path": str(tmp_path)}, "health": {"port": 0},
              "offline": {"allowed_hotkeys": [validator_hotkey]}, "axon": {"port": port},
              "shutdown_grace_s": grace_s, "generation": {"target_s": 25}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "miner", "run", "--offline", "--config", str(path)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    engine = None
    for line in proc.stderr:
        if m := re.search(r"the llama.cpp engine serves from process (\d+)", line):
            engine = int(m[1])
        if "axon serving" in line:
            break
    assert proc.poll() is None and engine, "the miner exited before serving, or without an engine process"
    return proc, bt.AxonInfo(version=0, ip="127.0.0.1", port=port, ip_type=4,
                             hotkey=miner_wallet.hotkey.ss58_address, coldkey=""), engine


@pytest.mark.parametrize("grace_s", [60.0, 0.0], ids=["finishes-within-grace", "fails-explicitly-at-once"])
def test_sigterm_stops_accepting_settles_requests_in_flight_unloads_and_exits_0(tmp_path, grace_s):
    validator = make_wallet(str(tmp_path), "validator")
    proc, axon, engine = start_miner(tmp_path, grace_s, validator.hotkey.ss58_address)
    watchdog = threading.Timer(grace_s + 120, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        with no_public_ip_lookup():  # one per thread: a Dendrite's session belongs to one event loop
            dendrite, second = bt.Dendrite(wallet=validator), bt.Dendrite(wallet=validator)
        # The shortest task, in English (the fewest tokens for the demo model): done well within the grace
        # even on a busy CPU, and still seconds long, so the signal comes while it is being written
        request = StoryGenerationSynapse(**examples.example_fields("blueprint"))
        in_flight: list[StoryGenerationSynapse] = []
        asking = threading.Thread(target=lambda: in_flight.append(
            dendrite.query(axons=[axon], synapse=request, timeout=60, deserialize=False)[0]))
        asking.start()
        time.sleep(1.0)  # the prompt alone takes about this long to read on 2 cores
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = second.query(axons=[axon], synapse=request, timeout=10, deserialize=False)[0]
        asking.join(timeout=90)
        code = proc.wait(timeout=grace_s + 30)
        log = proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert code == 0 and "stopped" in log
    assert not Path(f"/proc/{engine}").exists(), "the engine process outlived the miner"
    answer = in_flight[0]
    assert answer.is_success and answer.generation_time > 0.5, (answer.output_data, log[-3000:])  # in flight at the signal
    if grace_s:
        assert "error" not in answer.output_data, (answer.output_data, log[-3000:])
        TASKS["blueprint"].check(answer_of(answer.output_data), Context(user_input="x"))
    else:
        assert "shutting down" in answer.output_data["error"], answer.output_data
        assert time.monotonic() - signalled < 30
        assert "requests still in flight after shutdown_grace_s" in log
    assert not late.is_success or "error" in late.output_data  # never answered after the signal
