"""Continuous batching and the time model, on the embedded model with the validators' Chinese requests:
answers decoded together stay valid, every answer is back by its hard limit, the target sizes but never
aborts, a request the queue cannot serve in time is refused at once, and prompts reuse cached prefixes."""
import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest

from backends import llama_lowlevel as ll
from backends.base import BackendBusy, BackendError, Request
from backends.chain import BackendState, Chain
from backends.constraint import Matcher
from backends.engine import MAX_BROKEN_STEPS, Job, Load
from backends.engine.admission import LOAD_WINDOW_S
from backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from backends.sizing import PLAN_MARGIN, Speed, shrink
from miner import examples
from miner.config import GenerationSettings
from miner.service import StoryService
from miner.tasks import TASKS, Context
from miner.tasks.common import obj, text
from tests.fakes import RefusesAfter

pytestmark = pytest.mark.slow  # the embedded model decoding real answers


def validators_request(service: StoryService, task: str, prompt: int = 0, hard_s: float = 55.0,
                       target_s: float = 6.0) -> tuple[Request, Context]:
    """A validators' request, sized for 6 s by default: what is tested here holds at any size."""
    fields = examples.validator_fields(task, examples.VALIDATOR_PROMPTS[prompt])
    spec, ctx = service.prepare(fields)
    now = time.monotonic()
    return service.request_for(spec, ctx, now + hard_s, now + target_s), ctx


@pytest.fixture(scope="module")
def service(embedded_backend):
    return StoryService(Chain([BackendState(embedded_backend, "local")]), GenerationSettings())


def test_answers_decoded_together_are_as_valid_as_serial_ones(embedded_backend, service):
    tasks = ["story_arc", "blueprint", "blueprint"]  # the third waits for a slot: the fixture has two
    requests = [validators_request(service, task, prompt=i, hard_s=120.0) for i, task in enumerate(tasks)]
    with ThreadPoolExecutor(len(tasks)) as pool:
        generations = list(pool.map(lambda r: embedded_backend.generate(r[0]), requests))
    for task, (_, ctx), generation in zip(tasks, requests, generations):
        answer = json.loads(generation.text)
        assert TASKS[task].check(answer, ctx) == answer
        assert generation.forced_tokens > 0  # keys and ids came as fast-forward batches, not samples
        assert generation.schema is not None


def test_an_answer_prone_to_long_strings_is_back_by_its_hard_limit(embedded_backend):
    unbounded = {"type": "object", "properties": {"story": {"type": "string", "minLength": 20000}},
                 "required": ["story"], "additionalProperties": False}  # no ceiling: nothing sizes it
    started = time.monotonic()
    request = Request(messages=[{"role": "user", "content": "Write the longest story you can."}],
                      max_tokens=100_000, deadline=started + 3.0, schema=unbounded)
    with pytest.raises(BackendBusy, match="hard limit"):  # overload, not a fault: no cool-down
        embedded_backend.generate(request)
    assert time.monotonic() - started < 3.5


def test_a_sized_answer_is_back_by_its_hard_limit_even_when_the_target_is_tiny(embedded_backend, service):
    request, ctx = validators_request(service, "characters", hard_s=40.0, target_s=1.0)
    generation = embedded_backend.generate(request)
    assert generation.schema == shrink(request.schema, 0.0)  # floors miss the 1 s target: planned for the limit
    answer = json.loads(generation.text)
    assert TASKS["characters"].check(answer, ctx) == answer  # written whole, not aborted at the target


def test_a_request_that_cannot_fit_even_its_floors_is_refused_at_once(embedded_backend, service):
    request, _ = validators_request(service, "chapters", hard_s=4.0, target_s=2.0)
    started = time.monotonic()
    with pytest.raises(BackendBusy, match="smallest answer"):
        embedded_backend.generate(request)
    assert time.monotonic() - started < 1.0


@pytest.fixture(scope="module")
def single():
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="one", parallel=1, seed=1))
    yield backend
    backend.close()


def ask(content: str, schema: dict, seconds: float, priority: float = 0.0) -> Request:
    return Request(messages=[{"role": "user", "content": content}], max_tokens=5000,
                   deadline=time.monotonic() + seconds, schema=schema, priority=priority)


def in_background(backend, request: Request, finished: list) -> threading.Thread:
    def run():
        outcome = _try(backend.generate, request)
        finished.append((request.priority, outcome))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_waiting_requests_are_served_by_stake_then_arrival(single):
    finished: list = []
    threads = [in_background(single, ask("Write a story.", obj(story=text(150, 160)), 60), finished)]
    while single.engine.active() == 0:
        time.sleep(0.01)
    for priority in (0.0, 5.0, 0.0):  # the staked caller arrives second and is served first
        threads.append(in_background(single, ask("Say hi.", obj(reply=text(1, 10)), 60, priority), finished))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert all(not isinstance(outcome, BackendError) for _, outcome in finished)
    assert [priority for priority, _ in finished] == [0.0, 5.0, 0.0, 0.0]


def test_a_request_the_queue_cannot_serve_in_time_is_refused_within_a_second(single):
    finished: list = []
    holder = in_background(single, ask("Write a tale.", obj(tale=text(300, 350)), 60), finished)
    while single.engine.active() == 0:
        time.sleep(0.01)
    asked = time.monotonic()
    with pytest.raises(BackendBusy, match="busy: 1 answers decoding"):
        single.generate(ask("Say hi.", obj(reply=text(1, 20)), 3))
    assert time.monotonic() - asked < 1.0
    holder.join()
    assert not isinstance(finished[0][1], BackendError)


def _try(fn, *args):
    try:
        return fn(*args)
    except BackendError as e:
        return e


def test_a_prompt_reuses_the_cells_of_an_earlier_one_it_shares_a_prefix_with(embedded_backend, service):
    def short(prompt: int) -> Request:  # the validators' prompt, a short answer
        request = validators_request(service, "blueprint", prompt=prompt)[0]
        return Request(messages=request.messages, max_tokens=64, deadline=time.monotonic() + 55,
                       schema=obj(title=text(2, 20)))

    embedded_backend.generate(short(3))
    again = embedded_backend.generate(short(3))
    assert again.cached_tokens == again.prompt_tokens - 1  # all but the last, whose logits start the answer
    other = embedded_backend.generate(short(5))
    assert 20 < other.cached_tokens < other.prompt_tokens - 1  # the system prompt and the start of the request


def test_identical_requests_at_once_evaluate_their_prompt_once_and_answer_differently(embedded_backend, service):
    """A 3.2.1 burst: validators of one block send the same request together. The second copies the
    first's prompt cells from its busy slot while the first is still answering (not from a cached prompt
    after it), and each answer is still sampled with its own seed."""
    request = validators_request(service, "chapters")[0]
    schema = obj(story=text(150, 300))
    embedded_backend.engine.forget_cached()

    def timed(_):
        started = time.monotonic()
        generation = embedded_backend.generate(Request(
            messages=request.messages, max_tokens=2000, deadline=time.monotonic() + 55, schema=schema,
            language_sample=request.language_sample))
        return started, time.monotonic(), generation

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(timed, range(2)))
    (_, first_end, first), (second_start, _, second) = sorted(both, key=lambda b: b[2].cached_tokens)
    assert [first.cached_tokens, second.cached_tokens] == [0, first.prompt_tokens - 1]  # one prefill, one copy
    assert second_start + second.first_token_s < first_end  # decoding side by side
    assert first.text != second.text
    for g in (first, second):
        assert 150 <= len(json.loads(g.text)["story"]) <= 300


def test_a_retry_continues_from_the_part_worth_keeping(embedded_backend, service):
    request, ctx = validators_request(service, "blueprint")
    first = embedded_backend.generate(request)
    answer = json.loads(first.text)
    keep = '{"title":' + json.dumps(answer["title"], ensure_ascii=False) + ',"genre":'
    retry = embedded_backend.generate(dataclasses.replace(  # as the chain retries
        request, messages=request.resize(first.schema), deadline=time.monotonic() + 55, schema=first.schema,
        resize=None, prefix=keep))
    assert retry.text.startswith(keep)
    again = json.loads(retry.text)
    assert again["title"] == answer["title"]
    assert TASKS["blueprint"].check(again, ctx) == again


def job_for(backend: LlamaCppBackend, prompt: list[int], matcher: Matcher | None, max_tokens: int = 40) -> Job:
    sampler = ll.SamplerChain(temperature=0.8, top_p=0.95, repeat_penalty=1.1, seed=1)
    return Job(prompt, sampler, matcher, max_tokens)


def test_one_answer_that_fails_mid_way_costs_only_itself(single):
    schema = obj(reply=text(1, 200))
    prompt = single.prompt_tokens([{"role": "user", "content": "Say hi."}])
    broken = single.engine.submit(time.monotonic() + 30, lambda load: job_for(
        single, prompt, RefusesAfter(single.engine.vocab.matcher(schema), 3)), (0.1, 0.1), 0.0)
    with pytest.raises(BackendError, match="the answer failed: .*injected"):
        broken.future.result(timeout=30)
    assert single.engine.alive()
    assert json.loads(single.generate(ask("Say hi.", schema, 30)).text)["reply"]


def test_a_failed_decode_costs_only_its_own_sequence_and_the_engine_serves_on(embedded_backend):
    invalid = [embedded_backend.model.n_vocab + 7]  # llama_decode refuses a token id outside the vocabulary
    engine = embedded_backend.engine
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(embedded_backend.generate, ask("Say hi.", obj(reply=text(40, 200)), 30))
        while engine.active() == 0:
            time.sleep(0.01)
        bad = engine.submit(time.monotonic() + 30, lambda load: job_for(embedded_backend, invalid, None), (0.1, 0.1),
                            0.0)
        with pytest.raises(BackendError, match="could not decode this answer"):
            bad.future.result(timeout=30)
        assert json.loads(good.result(timeout=30).text)["reply"]  # decoded beside it, retried in halves
    assert engine.alive() and engine.stats["failed_decodes"] >= 1
    assert json.loads(embedded_backend.generate(ask("Say hi.", obj(reply=text(1, 20)), 30)).text)["reply"]


def test_a_context_that_keeps_failing_is_rebuilt_and_health_says_so(monkeypatch):
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="doomed", parallel=1))
    try:
        def broken(batch):
            raise ll.LlamaError("llama_decode failed with code -3 (injected)")
        monkeypatch.setattr(backend.ctx, "decode", broken)
        for _ in range(MAX_BROKEN_STEPS):
            with pytest.raises(BackendError, match="injected"):
                backend.generate(ask("Say hi.", obj(reply=text(1, 20)), 30))
        assert not backend.engine.alive()
        with pytest.raises(BackendError, match="engine has stopped: LlamaError.*injected"):
            backend.engine.submit(time.monotonic() + 30, lambda load: None, (0.1, 0.1), 0.0)
        health = backend.health()  # the health check rebuilds the context; the model stays loaded
        assert health.ok and "rebuilt the llama.cpp context" in health.detail and "injected" in health.detail
        assert json.loads(backend.generate(ask("Say hi.", obj(reply=text(1, 20)), 30)).text)["reply"]
    finally:
        backend.close()


@pytest.fixture(scope="module")
def four():
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="four", parallel=4, n_ctx=8192))
    yield backend
    backend.close()


def bad_job(backend: LlamaCppBackend) -> Callable[[Load], Job]:
    invalid = [backend.model.n_vocab + 7]  # llama_decode refuses a token id outside the vocabulary
    return lambda load: job_for(backend, invalid, None)


def test_three_sequences_failing_in_one_step_leave_the_healthy_answer_and_the_engine(four):
    """Each failing sequence fails its own request; the step decoded the healthy one, so the context is not
    broken (it counted each failure as a broken step, and the third stopped the engine)."""
    engine = four.engine
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(four.generate, ask("Say hi.", obj(reply=text(40, 200)), 60))
        while engine.active() == 0:
            time.sleep(0.01)
        with engine.admission.cond:  # all three join between the same two steps
            bad = [engine.submit(time.monotonic() + 30, bad_job(four), (0.1, 0.1), 0.0) for _ in range(3)]
        for ticket in bad:
            with pytest.raises(BackendError, match="could not decode this answer"):
                ticket.future.result(timeout=30)
        assert json.loads(good.result(timeout=60).text)["reply"]
    assert engine.alive()


def test_a_request_while_the_context_is_rebuilt_waits_for_the_new_one(monkeypatch):
    """The rebuilt engine is reachable only once it has measured its speed: a request that comes during the
    warm-up waits for it (it met an engine without a speed, an AttributeError the chain counts as a failure)."""
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="rebuilt", parallel=1))
    try:
        def broken(batch):
            raise ll.LlamaError("llama_decode failed with code -3 (injected)")
        monkeypatch.setattr(backend.ctx, "decode", broken)  # this context only: the rebuilt one decodes
        for _ in range(MAX_BROKEN_STEPS):
            with pytest.raises(BackendError, match="injected"):
                backend.generate(ask("Say hi.", obj(reply=text(1, 20)), 30))
        assert not backend.engine.alive()
        real, warming = ll.Context.decode, threading.Event()

        def slow(ctx, batch):  # the new context's warm-up takes a second or two
            warming.set()
            time.sleep(0.03)
            return real(ctx, batch)

        monkeypatch.setattr(ll.Context, "decode", slow)
        with ThreadPoolExecutor(2) as pool:
            rebuilt = pool.submit(backend.health)
            assert warming.wait(timeout=30)  # the new engine is measuring its speed now
            answer = pool.submit(backend.generate, ask("Say hi.", obj(reply=text(1, 20)), 60))
            assert rebuilt.result(timeout=60).ok
            assert json.loads(answer.result(timeout=60).text)["reply"]
    finally:
        backend.close()


def test_an_error_placing_a_request_fails_only_that_request(embedded_backend, monkeypatch):
    engine = embedded_backend.engine
    real = engine.ctx.forget
    failures = []

    def fails_once(seq, start=0):  # the newcomer's placement drops its slot's stale cells: that fails
        if not failures:
            failures.append(seq)
            raise ll.LlamaError("llama.cpp could not drop positions (injected)")
        return real(seq, start)

    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(embedded_backend.generate, ask("Say hi.", obj(reply=text(40, 200)), 60))
        while engine.active() == 0:
            time.sleep(0.01)
        monkeypatch.setattr(engine.ctx, "forget", fails_once)
        with pytest.raises(BackendError, match="injected"):
            embedded_backend.generate(ask("Say hi.", obj(reply=text(1, 20)), 30))
        assert json.loads(good.result(timeout=60).text)["reply"]
    assert engine.alive() and failures


def test_compaction_moves_answers_only_under_the_lock_submit_reads_them_under(embedded_backend, service, monkeypatch):
    engine = embedded_backend.engine
    held = []
    real = engine.kv.compact

    def compact():
        held.append(engine.admission.cond._is_owned())
        real()

    monkeypatch.setattr(engine.kv, "compact", compact)
    with ThreadPoolExecutor(2) as pool:  # the short one ends first, and the long one moves down to its slot
        short = pool.submit(embedded_backend.generate, ask("Say hi.", obj(reply=text(1, 10)), 60))
        while engine.active() == 0:
            time.sleep(0.01)
        long = pool.submit(embedded_backend.generate, ask("Tell a tale.", obj(tale=text(200, 260)), 60))
        short.result(timeout=60)
        long.result(timeout=60)
    assert held and all(held)


def test_the_recent_load_counts_the_answer_that_is_leaving(single, monkeypatch):
    """The load answers are planned for: one answer decoding alone for T seconds leaves an average of
    1 - exp(-T / 60) (it was recorded after the answer had left, as if nothing had decoded)."""
    admission = single.engine.admission
    monkeypatch.setattr(admission, "_load_avg", 0.0)
    monkeypatch.setattr(admission, "_load_at", time.monotonic())
    generation = single.generate(ask("Tell a tale.", obj(tale=text(150, 200)), 60))
    decoding = generation.seconds - generation.first_token_s
    assert admission.load_avg >= 0.5 * (1 - math.exp(-decoding / LOAD_WINDOW_S))


def test_a_unified_cache_out_of_room_drops_idle_prompts_and_serves_on(service, monkeypatch):
    """llama.cpp finds no room for a batch (a fragmented unified cache): the cached prompts of free slots go,
    and the batch is decoded again."""
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="unified-full", n_ctx=8192,
                                                             kv_unified=True))
    try:
        with ThreadPoolExecutor(2) as pool:  # both slots now hold a cached prompt
            list(pool.map(backend.generate, [ask("Say hi.", obj(reply=text(1, 10)), 60),
                                             ask("Name a colour.", obj(colour=text(1, 10)), 60)]))
        real, refused = backend.ctx.decode, []

        def full_once(batch):
            if not refused:
                refused.append(batch.n)
                raise ll.NoKvRoom(f"no free KV cells for {batch.n} tokens (injected)")
            return real(batch)

        monkeypatch.setattr(backend.ctx, "decode", full_once)
        answer = backend.generate(ask("Name a fruit.", obj(fruit=text(1, 10)), 60))
        assert json.loads(answer.text)["fruit"] and refused
        assert backend.engine.stats["failed_decodes"] == 1
        assert sum(bool(s.cached) for s in backend.engine.kv.slots) == 1  # the other slot's prompt was dropped
    finally:
        backend.close()


def test_no_room_for_a_lone_sequence_with_streams_is_busy_not_a_failure(single, monkeypatch):
    def full(batch):
        raise ll.NoKvRoom("no free KV cells (injected)")
    monkeypatch.setattr(single.ctx, "decode", full)
    with pytest.raises(BackendBusy, match="busy: llama.cpp could not decode this answer: .*injected"):
        single.generate(ask("Say hi.", obj(reply=text(1, 20)), 30))
    monkeypatch.undo()
    assert single.engine.alive()


def hold_first_then_ask(backend: LlamaCppBackend, slack: float) -> tuple[float, float]:
    """A free-text answer whose hard limit is `slack` times the time planned for it alone, then a newcomer
    with a long prompt: (when the first ended, when the newcomer started), from the newcomer's arrival."""
    engine = backend.engine
    engine.forget_cached()
    prompt = backend.prompt_tokens([{"role": "user", "content": "Tell a long story about the sea."}])
    long_prompt = backend.prompt_tokens([{"role": "user", "content": "The tide came in. " * 100}])
    tokens = 50
    alone = tokens * engine.speed.step_s(1) * PLAN_MARGIN + len(prompt) / engine.speed.prefill_tps
    first = engine.submit(time.monotonic() + alone * slack, lambda load: job_for(backend, prompt, None, tokens),
                          (0.1, 0.1), 0.0)
    while engine.active() == 0:
        time.sleep(0.01)
    second = engine.submit(time.monotonic() + 60, lambda load: job_for(backend, long_prompt, None, 5), (0.1, 0.1),
                           0.0, prompt_tokens=len(long_prompt))
    try:
        first.future.result(timeout=60)  # raises if the first missed its limit
        ended = time.monotonic() - second.arrived
    finally:
        started = second.future.result(timeout=60).queued_s  # the engine is idle again for the next test
    return ended, started


def test_a_newcomer_that_would_push_a_running_answer_past_its_limit_waits(embedded_backend):
    # The newcomer's prompt alone (about 2 s on 2 cores) takes longer than the first answer's whole limit
    # (about 1.3 s): it waits for the first.
    ended, started = hold_first_then_ask(embedded_backend, slack=2.0)
    assert started >= ended - 0.05
    ended, started = hold_first_then_ask(embedded_backend, slack=20.0)  # room for both: admitted at once
    assert started < ended / 10


def test_a_request_that_fits_only_alone_waits_for_the_running_answer_instead_of_being_refused(embedded_backend):
    """A chapters answer that fits its limit decoding alone but not beside another: it goes back in line
    until the other ends, then is served (it was refused as busy at once, an answer a validator lost), and
    it does not hold up a short request that fits beside the running one."""
    engine = embedded_backend.engine
    prompt = embedded_backend.prompt_tokens([{"role": "user", "content": "Say hi."}])
    asked: list[int] = []

    def alone_only(load: Load) -> Job:
        asked.append(load.sequences)
        if load.sequences > 1:
            raise BackendBusy(f"busy: with {load.sequences} answers decoding, even the smallest answer needs more "
                              f"than the time left (as planned for a long chapter)")
        return job_for(embedded_backend, prompt, None, 5)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(embedded_backend.generate, ask("Tell a tale.", obj(tale=text(150, 200)), 60))
        while engine.active() == 0:
            time.sleep(0.01)
        waiting = engine.submit(time.monotonic() + 60, alone_only, (0.5, 5.0), 0.0)
        while not asked:
            time.sleep(0.01)
        beside = pool.submit(embedded_backend.generate, ask("Say hi.", obj(reply=text(1, 10)), 60))
        beside.result(timeout=60)
        beside_done = time.monotonic()
        running.result(timeout=60)
        ended = time.monotonic()
        result = waiting.future.result(timeout=60)
    assert asked[0] == 2 and asked[-1] == 1  # asked beside the tale, then alone
    assert waiting.arrived + result.queued_s >= ended - 0.5  # it started once the tale had ended
    assert beside_done < ended  # the short request behind it did not wait for the tale: it fit beside it


def test_an_idle_engine_admits_a_request_that_fits_alone_whatever_the_recent_load(embedded_backend, service,
                                                                                    monkeypatch):
    # This machine's speed as a fresh miner measures it (tests that switch backends slow the shared one's steps).
    backend, engine = embedded_backend, embedded_backend.engine
    monkeypatch.setattr(engine, "speed", Speed(300.0, {1: 0.012, 2: 0.017}))
    monkeypatch.setattr(engine.admission, "_load_avg", float(backend.parallel))  # a busy minute just ended
    request = validators_request(service, "chapters")[0]
    tpc = backend.tokens_per_char(request.language_sample)
    floor = backend._cost(shrink(request.schema, 0.0), tpc)
    prompt = len(backend.prompt_tokens(request.messages))
    share = engine.prefill_share()  # earlier tests' prompts: it only falls from here
    alone, beside = (backend._seconds(floor, prompt, n, share) for n in (1, backend.parallel))
    assert beside > 1.2 * alone
    hard = 0.95 * beside  # the smallest answer fits alone, not at the recent load
    request = dataclasses.replace(request, deadline=time.monotonic() + hard, target=time.monotonic() + hard)
    with ThreadPoolExecutor(1) as pool:  # admitted is what counts: the answer itself is left unwritten
        running = pool.submit(backend.generate, request)
        while engine.active() == 0 and not running.done():
            time.sleep(0.01)
        request.cancelled.set()
        with pytest.raises(BackendError, match="cancelled"):  # not "busy": it was admitted
            running.result(timeout=60)


def test_a_cancelled_request_leaves_its_slot_at_the_next_step(single):
    endless = {"type": "object", "properties": {"story": {"type": "string", "minLength": 20000}},
               "required": ["story"], "additionalProperties": False}  # nothing ends it early
    request = ask("Tell a long story about the sea.", endless, 60)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(single.generate, request)
        while single.engine.active() == 0 and not running.done():
            time.sleep(0.01)
        time.sleep(0.3)
        request.cancelled.set()
        with pytest.raises(BackendError, match="cancelled after .* tokens: the caller has gone away"):
            running.result(timeout=30)  # long before the answer's 20,000 characters or its 60 s
    assert single.engine.active() == 0  # the slot is free by the time the caller hears
    assert json.loads(single.generate(ask("Say hi.", obj(reply=text(1, 20)), 30)).text)["reply"]


@pytest.mark.parametrize("deadline", [math.nan, math.inf])
def test_a_deadline_that_is_not_a_finite_time_is_refused_clearly(single, deadline):
    request = dataclasses.replace(ask("Say hi.", obj(reply=text(1, 20)), 30), deadline=deadline)
    with pytest.raises(BackendError, match="deadline is (nan|inf): it must be a finite time"):
        single.generate(request)


def test_a_unified_cache_serves_requests_together_and_shares_a_burst_prompt(service):
    """kv_unified (auto on a GPU): one pool of cells. The same burst shares its prompt's cells, and two
    different requests decode side by side, valid. Last in this file: a second model decoding in this
    process slows the shared one's steps for a while (OpenMP), and the tests above time their limits."""
    backend = LlamaCppBackend.from_settings(LlamaCppSettings(type="llama_cpp", name="unified", n_ctx=8192,
                                                             kv_unified=True, seed=1))
    try:
        assert backend.ctx.kv_unified and backend.engine.kv.room == 8192 // backend.parallel
        request = validators_request(service, "blueprint")[0]
        schema = obj(story=text(100, 200))
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: backend.generate(Request(
                messages=request.messages, max_tokens=1000, deadline=time.monotonic() + 55, schema=schema,
                language_sample=request.language_sample)), range(2)))
        assert sorted(g.cached_tokens for g in both) == [0, both[0].prompt_tokens - 1]
        for g in both:
            assert 100 <= len(json.loads(g.text)["story"]) <= 200
        tasks = ["blueprint", "blueprint"]  # two requests, each its own prompt
        requests = [validators_request(service, task, prompt=i, hard_s=120.0) for i, task in enumerate(tasks)]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda r: json.loads(backend.generate(r[0]).text), requests))
        for task, (_, ctx), answer in zip(tasks, requests, answers):
            assert TASKS[task].check(answer, ctx) == answer
    finally:
        backend.close()
