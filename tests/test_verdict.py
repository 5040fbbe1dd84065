"""Answer times: each task's tokens for the validators' request, the verdict at a speed, the health row, and
`fit`'s table on this host."""
from __future__ import annotations

import json

import pytest

from backends.base import Gauges
from miner import verdict
from miner.cli import main as cli
from miner.config import Config, GenerationSettings
from miner.neuron import Miner
from miner.service import StoryService
from models.embedded import embedded_model_path
from tests.fakes import FakeBackend, chain_of

TASKS = {"blueprint", "characters", "story_arc", "chapters"}


class Measured(FakeBackend):
    """A local backend whose warm-up measured `decode` tok/s for one answer alone."""
    mode = "local"

    def __init__(self, name: str, decode: float):
        super().__init__(name)
        self.decode = decode

    def gauges(self) -> Gauges:
        return Gauges(0, 0, {1: self.decode, 4: 3 * self.decode}, prefill_tok_s=4 * self.decode)


def test_each_task_shrinks_from_full_to_floors_to_least() -> None:
    work = verdict.loads(verdict.TOKENS_PER_CHAR)
    assert {w.task for w in work} == TASKS
    for w in work:
        sizes = w.answer_tokens
        assert w.prompt_tokens > 50 and sizes["full"] > sizes["floors"] >= sizes["least"] > 0, w


def test_a_gguf_file_is_measured_with_its_own_tokenizer() -> None:
    costs = verdict.tokens_per_char(embedded_model_path())
    # SmolLM2's 49k vocabulary spends more than a token on a Chinese character, a fraction on an English one
    assert costs["Simplified Chinese"] > 1.2 and costs["English"] < 0.4
    assert costs != verdict.TOKENS_PER_CHAR


@pytest.mark.parametrize("decode, slow", [(500.0, set()), (0.5, TASKS)])
def test_the_verdict_names_the_tasks_too_slow_and_the_fix(decode: float, slow: set) -> None:
    speed = verdict.Speed(4 * decode, decode, "given")
    found = verdict.verdicts(verdict.loads(verdict.TOKENS_PER_CHAR), speed, 55.0)
    assert {v.task for v in found if v.size is None} == slow
    line = verdict.problem(found, speed)
    if slow:
        assert line.startswith("cannot answer blueprint, characters, story_arc, chapters in 55 s here")
        assert "put an API backend after it" in line
    else:
        assert line is None and all(v.size == "full" for v in found)


def test_health_degrades_only_while_no_backend_after_it_can_answer() -> None:
    settings = GenerationSettings()
    alone = verdict.check([Measured("local", 0.5)], settings)
    assert alone.ok is False and "put an API backend after it" in alone.detail
    with_fallback = verdict.check([Measured("local", 0.5), FakeBackend("openai")], settings)
    assert with_fallback.ok is True and "openai answers when it cannot" in with_fallback.detail
    fast = verdict.check([Measured("local", 500.0)], settings)
    assert fast.ok is True and fast.detail.startswith("every task arrives within 55 s")
    assert verdict.check([FakeBackend("api only")], settings) is None  # nothing local to judge
    miner = Miner(Config(), StoryService(chain_of(Measured("local", 0.5)), settings), None, offline=True)
    row = next(c for c in miner.checks() if c.name == "answer time")
    assert row.ok is False  # degraded, never down: restarting cannot make the model faster


def test_the_real_engine_reports_its_warm_up_speed(embedded_backend) -> None:
    speed = verdict.learned_speed(embedded_backend)
    assert speed.prefill_tok_s > speed.decode_tok_s > 1
    text, too_slow = verdict.start_report([embedded_backend], GenerationSettings())
    assert "measured at warm-up" in text and all(task in text for task in TASKS)
    assert too_slow == ("cannot answer" in text)


def test_fit_times_each_task_on_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["fit", "--model", "llama-3.1-70b", "--vram-gb", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"]["read_bytes_per_s"] > 1e9 and out["host"]["ram_bytes"] > 0
    assert out["speed"]["decode_tok_s"] < 5  # ~29 GiB read from RAM a token: no host reads that 5 times a second
    assert out["verdict"] and ("cannot answer" in out["verdict"] or "not enough RAM" in out["verdict"])
    assert cli(["fit", "--model", "llama-3.1-8b", "--vram-gb", "6"]) == 0
    text = capsys.readouterr().out
    assert "this host:" in text and "answer times for the validators' request" in text
