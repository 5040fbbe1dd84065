"""The llama.cpp engine in a supervised child process, with faults injected into the real thing: the
embedded model in llama.cpp, a real Axon and Dendrite on loopback, the child SIGKILLed mid-answer, aborting
inside llama_decode (as ggml does on a CUDA error), and sleeping inside it (a decode that never returns).
Each time the request in flight gets an answer (an error, or the next backend's) well within the
validators' 60 s, health says down while it lasts, and the next request is answered by the new child."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import bittensor as bt
import pytest

from backends.base import Health
from backends.chain import BackendState, Chain
from backends.custom_command import CustomCommandBackend
from backends.engine.step_clock import StepClock, stall_limit, stalled
from backends.llama_cpp import LlamaCppSettings, offload_problem
from backends.llama_process import LlamaCppProcess, backoff_s, vram_verdict
from miner import examples
from miner.config import Config, GenerationSettings
from miner.contract import answer_of, error_of
from miner.demo import make_wallet, start_offline_miner
from miner.forwarded import StoryGenerationSynapse, forward
from miner.health import HealthReport, NOT_CHECKED
from miner.neuron import no_public_ip_lookup
from miner.service import StoryService
from miner.tasks import TASKS, Context
from models import fit
from models.embedded import embedded_model_path

pytestmark = pytest.mark.slow  # each starts the embedded model in a process of its own, some a real Axon

STALL_S = 2.0  # the tests' stall limit (the default is 20 s); pings go every PING_EVERY_S
FIELDS = examples.validator_fields("blueprint", examples.VALIDATOR_PROMPTS[3])


def supervised(fault: str | None = None, **settings) -> LlamaCppProcess:
    return LlamaCppProcess(LlamaCppSettings(**{"type": "llama_cpp", "name": "local", "seed": 1, "n_ctx": 4096,
                                               "parallel": 1, "stall_s": STALL_S, **settings}), fault=fault)


def wait_until(what, seconds: float = 90.0, every: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(every)
    raise AssertionError(f"not within {seconds} s")


class Served:
    """An offline miner on loopback whose chain is `backends`; ask() sends the 3.2.1 validators' request."""

    def __init__(self, tmp_path: Path, *backends):
        self.validator = make_wallet(str(tmp_path), "validator")
        chain = Chain([BackendState(b, b.name) for b in backends], failures_before_cooldown=2, cooldown_s=0.0)
        with no_public_ip_lookup():
            service = StoryService(chain, GenerationSettings(target_s=5))  # small answers: the faults are the point
            self.miner = start_offline_miner(Config(), service, str(tmp_path), [self.validator.hotkey.ss58_address])
            self.dendrite = bt.Dendrite(wallet=self.validator)

    def ask(self) -> tuple[dict, float]:
        started = time.monotonic()
        output = self.dendrite.query(axons=[self.miner.axon.info()], synapse=StoryGenerationSynapse(**FIELDS),
                                     timeout=60, deserialize=True)[0]
        return output, time.monotonic() - started

    def ask_in_background(self) -> tuple[threading.Thread, list]:
        answers: list = []
        thread = threading.Thread(target=lambda: answers.append(self.ask()))
        thread.start()
        return thread, answers

    def close(self) -> None:
        self.miner.close()


def assert_valid(output: dict, mode: str) -> None:
    assert error_of(output) is None, output
    TASKS["blueprint"].check(answer_of(output), Context(user_input="x"))
    assert output["model_info"]["mode"] == mode and forward(output, "blueprint").problems == []


def assert_recovers(backend: LlamaCppProcess, served: Served, restarts: int) -> None:
    health = backend.health()
    assert not health.ok and "restarting" in health.detail, health
    health = wait_until(lambda: (h := backend.health()).ok and h)
    assert "restart(s) in the last hour" in health.detail, health
    assert backend.restarts == restarts
    output, _ = served.ask()
    assert_valid(output, "local")


def test_a_sigkilled_engine_costs_the_answer_in_flight_and_is_replaced(tmp_path):
    backend = supervised()
    served = Served(tmp_path, backend)
    try:
        first = backend.pid
        steps = backend.clock.steps
        thread, answers = served.ask_in_background()
        wait_until(lambda: backend.clock.steps > steps + 10, 60, 0.02)  # the answer is being written
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        thread.join(60)
        output, _ = answers[0]
        assert time.monotonic() - killed < 10
        assert error_of(output) == ("failed", "no backend could answer: local: the llama.cpp engine process was killed "
                                              "by signal 9 (SIGKILL); the answer was lost"), output
        assert forward(output, "blueprint").problems == []  # an error answer a validator forwards whole
        assert_recovers(backend, served, restarts=1)
        assert backend.pid != first
        metrics = served.miner.metrics.render().decode()
        assert 'storynet_engine_restarts_total{backend="local"} 1.0' in metrics
        assert 'storynet_engine_last_step_age_seconds{backend="local"}' in metrics
    finally:
        served.close()
    assert wait_until(lambda: not Path(f"/proc/{first}").exists(), 10)


def test_an_abort_inside_llama_decode_goes_to_the_next_backend(tmp_path, writer):
    backend = supervised(fault="abort:5")  # the 5th decode after the warm-up: inside the first answer
    served = Served(tmp_path, backend, CustomCommandBackend.from_settings(writer))
    try:
        output, seconds = served.ask()
        assert_valid(output, "custom")  # the fallback wrote it, in the same request
        assert seconds < 20
        assert_recovers(backend, served, restarts=1)
    finally:
        served.close()


def test_a_decode_that_never_returns_is_caught_and_the_engine_replaced(tmp_path, caplog):
    backend = supervised(fault="stall:5")  # sleeps an hour inside llama_decode
    served = Served(tmp_path, backend)
    try:
        with caplog.at_level(logging.ERROR, logger="backends.llama_process"):
            output, seconds = served.ask()
        kind, text = error_of(output)
        assert kind == "failed" and "the llama.cpp engine process stalled: a step ran" in text, output
        assert seconds < STALL_S + 15
        assert_recovers(backend, served, restarts=1)
        lost = [r.getMessage() for r in caplog.records if "(pid" in r.getMessage()]
        assert len(lost) == 1 and "stalled: a step ran" in lost[0] and "injected fault: stall" in lost[0], lost
    finally:
        served.close()


def test_a_child_that_fails_at_load_backs_off_and_serves_again_once_it_can(tmp_path, caplog):
    path = tmp_path / "model.gguf"
    shutil.copyfile(embedded_model_path(), path)
    backend = supervised(model_path=str(path))
    try:
        path.rename(tmp_path / "away.gguf")
        with caplog.at_level(logging.ERROR, logger="backends.llama_process"):
            os.kill(backend.pid, signal.SIGKILL)
            time.sleep(4.5)
            tries = [r.getMessage() for r in caplog.records if "could not be started again" in r.getMessage()]
            health = backend.health()
        assert 2 <= len(tries) <= 3, tries  # at once, then 1 and 2 s apart (then 4, 8 ...): no spinning
        assert f"model file {path} does not exist" in tries[0]
        assert not health.ok and "does not exist" in health.detail, health
        (tmp_path / "away.gguf").rename(path)
        assert wait_until(lambda: backend.health().ok, 30)
        assert backend.restarts == 1
    finally:
        backend.close()


def test_closing_fails_what_is_in_flight_and_leaves_no_process(tmp_path):
    backend = supervised()
    served = Served(tmp_path, backend)
    pid = backend.pid
    thread, answers = served.ask_in_background()
    wait_until(lambda: backend.clock.steps > 5, 60, 0.02)
    backend.close()
    thread.join(30)
    served.close()
    kind, text = error_of(answers[0][0])
    assert kind == "failed" and "shutting down" in text, text
    assert not Path(f"/proc/{pid}").exists() and backend.pid is None


# --- the rules, on their own ---------------------------------------------------------------------------------
def test_a_step_counts_as_stalled_past_max_of_the_floor_and_ten_times_its_plan():
    clock = StepClock()
    assert stalled(clock) is None and clock.last_step_age_s() is None
    clock.begin(planned=0.05)
    now = clock.started
    assert stall_limit(0.05) == 20.0 and stall_limit(3.0) == 30.0
    assert stalled(clock, now=now + 19) is None and stalled(clock, now=now + 21) == pytest.approx(21)
    assert stalled(clock, floor=2.0, now=now + 2.5) == pytest.approx(2.5)
    clock.end()
    assert stalled(clock, now=now + 100) is None and clock.steps == 1 and clock.last_step_age_s() < 1


def test_restarts_back_off_to_a_minute():
    assert [backoff_s(n) for n in range(1, 10)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_gpu_memory_grown_past_the_plan_is_named_with_the_figures():
    mib = 2 ** 20
    assert vram_verdict(500 * mib, 6300 * mib, 5778 * mib, 0.10) is None  # 5800 MiB against 5778 + 10%
    verdict = vram_verdict(500 * mib, 7000 * mib, 5778 * mib, 0.10)
    assert verdict.startswith("GPU memory in use has grown by 6,500 MiB since the model loaded, against a plan of "
                              "5,778 MiB (vram_margin 10%)")
    assert vram_verdict(None, 7000 * mib, 5778 * mib, 0.10) is None  # nothing measured before the load


def test_a_gpu_build_that_got_no_gpu_layers_is_degraded_or_down_as_asked():
    cpu_plan = fit.plan(embedded_model_path(), vram_bytes=None)
    assert offload_problem("auto", cpu_plan, gpu_build=False) is None  # a CPU build: nothing was asked
    down, text = offload_problem("auto", cpu_plan, gpu_build=True)
    assert not down and "every layer runs on the CPU" in text and "nvidia-smi" in text
    down, text = offload_problem(33, cpu_plan, gpu_build=True)
    assert down and text.startswith("n_gpu_layers is 33, but the model runs on the CPU")
    assert offload_problem(0, cpu_plan, gpu_build=True) is None


def test_a_degraded_backend_makes_a_degraded_report_that_says_why():
    from backends.chain import BackendStatus
    row = BackendStatus("local", "llama_cpp", "local", True, "GPU memory in use has grown by ...", 0.0, 3,
                        degraded=True)
    report = HealthReport.of([row], NOT_CHECKED, "config.yaml", "test")
    assert report.status == "degraded" and report.exit_code == 1
    assert report.summary == "serving on local, but local: GPU memory in use has grown by ..."
    assert "degraded" in report.render()
    assert HealthReport.from_json(report.to_json()).backends[0].degraded
    assert Health(True, "fine").degraded is False


def test_a_stopped_engine_that_answers_nothing_is_caught_by_its_pings(tmp_path):
    backend = supervised()
    served = Served(tmp_path, backend)
    try:
        os.kill(backend.pid, signal.SIGSTOP)  # idle: no step runs, so only the pings can tell
        output, seconds = served.ask()
        kind, text = error_of(output)
        assert kind == "failed" and "stopped answering: no reply to a ping" in text, output
        assert seconds < 5 + STALL_S + 5
        assert_recovers(backend, served, restarts=1)
    finally:
        served.close()


def test_loadtest_reports_each_fault_with_what_it_cost_and_when_answers_were_valid_again():
    from miner.loadtest import Fault, Outcome, Run, engine_pid, recoveries
    run = Run(faults=[Fault(100.0, "kill", 41), Fault(400.0, "stall", 42)])
    run.outcomes = [Outcome(0, "blueprint", "p", 90.0, "valid", 5.0), Outcome(1, "characters", "p", 95.0, "error", 6.0),
                    Outcome(2, "blueprint", "p", 101.0, "busy", 0.1), Outcome(3, "blueprint", "p", 110.0, "valid", 4.0),
                    Outcome(0, "story_arc", "p", 390.0, "error", 30.0)]
    first, second = recoveries(run)
    assert first["valid_again_after_s"] == 14.0 and first["until_then"] == {"error": 1, "busy": 1}
    assert second["valid_again_after_s"] is None and second["until_then"] == {"error": 1}
    assert engine_pid(os.getpid()) is None  # pytest starts no engine process of its own
