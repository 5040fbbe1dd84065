"""Answers sized to the clock: shrinking toward the floors, the worst case, and the fit itself, checked with
the embedded model's real tokenizer on the validators' Chinese requests."""
import json
import random

import numpy as np
import pytest

from backends import llama_lowlevel as ll
from backends.constraint import ENDS_ON_SENTENCE
from backends.sizing import (UNSCORED, CharCost, Cost, Speed, fit_schema, shrink, strings_in, value_chars,
                             worst_case)
from miner import examples
from miner.config import GenerationSettings
from miner.service import prepare
from miner.tasks import TASKS, Context
from miner.tasks.common import SAMPLES, aside, obj, prose, text, texts
from models.embedded import embedded_model_path

CHINESE = SAMPLES["Simplified Chinese"]


@pytest.fixture(scope="module")
def model():
    m = ll.Model(embedded_model_path(), 0, vocab_only=True)
    yield m
    m.close()


def count(model):
    return lambda s: len(model.tokenize(s, add_special=False, parse_special=False))


def test_shrink_moves_every_ceiling_toward_its_floor_and_never_below():
    schema = obj(a=text(50, 300), b=texts(2, 5, 2, 40))
    assert shrink(schema, 1.0) == schema
    floors = shrink(schema, 0.0)
    assert floors["properties"]["a"]["maxLength"] == 50
    assert floors["properties"]["b"]["maxItems"] == 2 and floors["properties"]["b"]["items"]["maxLength"] == 2
    half = shrink(schema, 0.5)
    assert half["properties"]["a"]["maxLength"] == 175 and half["properties"]["b"]["maxItems"] == 3
    assert schema["properties"]["a"]["maxLength"] == 300  # the original is left alone


def test_what_no_scorer_reads_shrinks_first_and_judged_prose_falls_below_its_floor_last():
    """Three stages: the unscored parts to their floors first (scale 1 -> 2/3), then the judged prose to its
    floors, the lengths the scoring rules reward (2/3 -> 1/3), then to its LEAST, the contract's own floor
    (1/3 -> 0), so an answer that must be small to arrive in time still arrives."""
    schema = obj(story=prose(300, 600, least=100), tone=aside(text(10, 40)), tags=aside(texts(2, 4, 2, 20)))
    assert shrink(schema, 1.0) == schema
    at = lambda scale, key: shrink(schema, scale)["properties"][key]  # noqa: E731
    assert (at(2 / 3, "story")["maxLength"], at(2 / 3, "tone")["maxLength"], at(2 / 3, "tags")["maxItems"]) == (
        600, 10, 2)
    assert at(0.5, "story")["maxLength"] == 450 and at(0.5, "story")["minLength"] == 300
    assert (at(1 / 3, "story")["minLength"], at(1 / 3, "story")["maxLength"]) == (300, 300)
    assert (at(1 / 6, "story")["minLength"], at(1 / 6, "story")["maxLength"]) == (200, 200)
    assert (at(0.0, "story")["minLength"], at(0.0, "story")["maxLength"]) == (100, 100)


def test_every_task_keeps_its_judged_prose_whole_while_what_no_scorer_reads_gives_way():
    for task in TASKS:
        spec, ctx = prepare(examples.validator_fields(task, examples.VALIDATOR_PROMPTS[0]), GenerationSettings())
        schema = spec.schema(ctx)
        unscored_only = shrink(schema, 2 / 3)
        for full, sized in zip(prose_nodes(schema), prose_nodes(unscored_only)):
            assert sized == full, task  # every judged prose string keeps its length
        assert worst_case(unscored_only, 1.0, len).tokens < worst_case(schema, 1.0, len).tokens, task


def prose_nodes(schema):
    """The judged prose strings of a schema, in order (not under an unscored node)."""
    if isinstance(schema, dict) and not schema.get(UNSCORED):
        if schema.get("pattern") == ENDS_ON_SENTENCE:
            yield schema
        for value in schema.values():
            yield from prose_nodes(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from prose_nodes(value)


def test_the_worst_case_counts_every_string_at_its_maximum_and_the_forced_text(model):
    schema = obj(title=text(1, 10), themes=texts(1, 3, 1, 5))
    cost = worst_case(schema, 2.0, count(model))
    assert cost.sampled == (10 + 3 * 5) * 2 + 4 + 2  # characters x tokens each, 4 string ends, 2 optional items
    assert cost.forced == count(model)('{"title":"","themes":["","",""]}')


def test_speed_interpolates_between_what_it_measured_and_follows_new_steps():
    speed = Speed(200.0, {1: 0.010, 4: 0.025})
    assert speed.step_s(1) == 0.010 and speed.step_s(2) == pytest.approx(0.015)
    assert speed.step_s(8) == pytest.approx(0.045)  # past the last point, on the same line
    assert speed.seconds(Cost(sampled=100, forced=50), prompt_tokens=150, n=1) == pytest.approx(1.0 + 1.0)
    for _ in range(2000):
        speed.observe_step(1, 0.020)
    assert speed.step_s(1) == pytest.approx(0.020, rel=0.01)


def test_steps_grow_with_the_context_attended_to_and_plans_count_it():
    speed = Speed(200.0, {1: 0.010, 2: 0.014})
    flat = speed.seconds(Cost(sampled=2000, forced=0), prompt_tokens=800, n=2)
    assert flat == pytest.approx(2000 * 0.014 + 800 / 200)
    for cells in range(200, 2200):  # one answer growing, as the engine reports its steps
        speed.observe_step(1, 0.010 + 3e-6 * cells, cells)
    assert speed.per_cell() == pytest.approx(3e-6, rel=0.01)
    assert speed.step_s(1, 3000) == pytest.approx(0.019, rel=0.01)
    assert speed.step_s(2, 1000) == pytest.approx(0.014 + 3e-6 * 1000, rel=0.01)  # 2's line borrows the slope
    grown = speed.seconds(Cost(sampled=2000, forced=0), prompt_tokens=800, n=2)
    assert grown == pytest.approx(2000 * (0.014 + 3e-6 * 2 * (800 + 1000)) + 800 / 200, rel=0.01)


# ms per step (llama_decode and a draw for each sequence) on 2 cores with the embedded model, measured
# 2026-12-04 at these KV cells in all: what an answer's steps really cost, one by one, as its context grows.
# Not a line: the cost per cell grows with the context.
STEP_MS = {1: [(300, 8.9), (1000, 10.2), (2000, 12.5), (3000, 15.8), (4000, 18.8)],
           2: [(600, 16.3), (2000, 20.9), (4000, 24.5), (6000, 30.1), (8000, 48.0)]}


def measured_step(n: int, cells: float) -> float:
    return float(np.interp(cells, *zip(*STEP_MS[n]))) / 1000


def test_a_plan_holds_against_the_measured_steps_of_an_answer_as_its_context_grows():
    """The time model learns a line per number of sequences from the steps served and prices an answer at
    the step halfway through its context; here it is checked against the step-by-step sum of measured
    steps, not against its own figures."""
    speed = Speed(200.0, {1: 0.0089, 2: 0.0163})
    for n, prompt, answer in [(1, 400, 1500), (2, 400, 1000), (1, 300, 600), (2, 500, 1400)] * 3:  # answers served
        for k in range(answer):
            cells = n * (prompt + k)
            speed.observe_step(n, measured_step(n, cells), cells)
    for n, prompt, sampled in ((1, 400, 1500), (1, 300, 200), (2, 600, 1200), (2, 300, 300), (2, 500, 1800)):
        planned = speed.planned(Cost(sampled, 0), prompt, n, prefill_share=0.0)
        taken = sum(measured_step(n, n * (prompt + k)) for k in range(sampled)) + prompt / 200.0
        assert taken <= planned <= 1.25 * taken, (n, prompt, sampled, planned / taken)


def test_what_forced_tokens_cost_is_learned_from_the_steps_that_carry_them():
    speed = Speed(300.0, {1: 0.010})
    assert speed.forced_s == pytest.approx(1 / 300)  # until steps say otherwise: a prompt token's price
    for _ in range(100):
        speed.observe_forced(1, 8, 0.010 + 8 * 0.0002)  # 8 forced tokens rode along, 0.2 ms each
    assert speed.forced_s == pytest.approx(0.0002, rel=0.05)
    assert speed.seconds(Cost(sampled=100, forced=500), 0, 1) == pytest.approx(100 * 0.010 + 500 * 0.0002, rel=0.05)


def seconds_of(model, speed, tokens_per_char, n):
    def measure(schema):
        cost = worst_case(schema, tokens_per_char, count(model))
        return cost, speed.seconds(cost, 300, n)
    return measure


def test_an_idle_fast_miner_keeps_the_full_size_and_a_slow_one_shrinks(model):
    schema = TASKS["characters"].schema(Context(user_input="x"))
    fast = fit_schema(schema, seconds_of(model, Speed(5000.0, {1: 0.004}), 0.8, 1), 25.0, 55.0)
    assert fast.scale == 1.0 and fast.schema == schema
    slow = fit_schema(schema, seconds_of(model, Speed(180.0, {1: 0.012, 4: 0.032}), 2.0, 2), 25.0, 55.0)
    assert 0.0 < slow.scale < 0.5 and slow.seconds <= 25.0


def test_floors_past_the_target_are_planned_against_the_hard_limit_or_refused(model):
    schema = TASKS["chapters"].schema(Context(user_input="x", chapter_ids=[1]))
    measure = seconds_of(model, Speed(180.0, {1: 0.012, 4: 0.032}), 2.0, 4)
    late = fit_schema(schema, measure, 25.0, 200.0)
    assert late.past_target and late.scale == 0.0 and 25.0 < late.seconds <= 200.0
    assert fit_schema(schema, measure, 25.0, 55.0) is None


@pytest.mark.parametrize("task", ["characters", "story_arc", "chapters"])
def test_a_schema_sized_for_a_slow_speed_fits_its_plan_with_every_string_at_its_maximum(model, task):
    fields = examples.validator_fields(task, examples.VALIDATOR_PROMPTS[0])
    ctx = prepare(fields, GenerationSettings())[1]
    tokens_per_char = count(model)(CHINESE) / len(CHINESE)
    speed = Speed(180.0, {1: 0.012, 4: 0.032})
    target = 50.0 if task == "chapters" else 25.0  # a 1000-character chapter alone is 2000 tokens here
    sized = fit_schema(TASKS[task].schema(ctx), seconds_of(model, speed, tokens_per_char, 2), target, 55.0)
    assert sized is not None and not sized.past_target
    largest = fill(sized.schema)  # every string at its maximum, in the request's language
    written = count(model)(json.dumps(largest, ensure_ascii=False, separators=(",", ":")))
    sampled = sum(count(model)(s) + 1 for s in strings_in(largest))  # each string's text and its end
    assert written <= sized.cost.tokens * 1.05 and sampled <= sized.cost.sampled * 1.05


def fill(schema):
    """The largest answer the schema allows, its strings cut from Chinese prose."""
    if "const" in schema:
        return schema["const"]
    if schema["type"] == "object":
        return {k: fill(v) for k, v in schema["properties"].items()}
    if schema["type"] == "array":
        prefix = schema.get("prefixItems") or []
        return [fill(prefix[i] if i < len(prefix) else schema["items"]) for i in range(schema["maxItems"])]
    return (CHINESE * 40)[: schema["maxLength"]]


def test_plans_cover_about_19_answers_in_20_where_the_mean_covers_half():
    rng = random.Random(3)
    cost = CharCost(len)  # a sample costs 1 token a character; answers cost 1.1 on average
    answer = "x" * 1000
    over_high = over_mean = 0
    for i in range(1000):
        seen = rng.gauss(1.1, 0.08)
        if i >= 50:  # once a few answers have been seen
            over_high += seen > cost.high(answer)
            over_mean += seen > cost.mean(answer)
        cost.learn(answer, round(seen * 1000))
    assert over_high / 950 < 0.06
    assert over_mean / 950 > 0.4


def test_answers_in_another_script_leave_the_requested_one_alone():
    cost = CharCost(lambda text: 2 * len(text))  # the Chinese sample: 2 tokens a character
    chinese = "海港小镇的灯塔在雾里亮了一整夜，看守人写下每一艘船的名字。"
    planned = cost.high(chinese)
    for _ in range(20):  # asked for Chinese, the model answered in English: cheap, and no news about Chinese
        cost.learn("The keeper wrote the names of the ships in a ledger. " * 10, 130)
    assert cost.high(chinese) == planned
    assert cost.high("An English request, planned from what English answers cost.") < 0.5


def test_answers_cheaper_than_the_range_bring_the_plan_to_its_floor():
    """A small model writes commoner characters than the sample (1.2 tokens a character where the sample
    costs 2): plans fall to the range's floor, and that hold is not counted as the answers' scatter."""
    cost = CharCost(lambda text: 2 * len(text))
    chinese = "海港小镇的灯塔在雾里亮了一整夜，看守人写下每一艘船的名字。"
    first = cost.high(chinese)
    for _ in range(20):
        cost.learn(chinese * 10, round(1.2 * len(chinese) * 10))
    assert cost.high(chinese) == pytest.approx(2 * CharCost.RANGE[0]) and cost.high(chinese) < first


def test_the_values_of_an_answer_cut_off_midway_are_counted_without_its_keys():
    answer = {"title": 'The "Relay"', "chapters": [{"id": 1, "paragraphs": ["Dawn.\nNoon: 灯塔。", "Dusk\u0007"]}]}
    text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    assert len(value_chars(text)) == len("".join(strings_in(answer)))  # each escape one character
    cut = text[:text.index("Dusk") + 3]
    assert len(value_chars(cut)) == len('The "Relay"Dawn.\nNoon: 灯塔。Dus')
    assert "paragraphs" not in value_chars(cut) and "title" not in value_chars(cut)
