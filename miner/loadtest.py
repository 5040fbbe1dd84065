"""Replay the subnet's validators against a miner, the way they query it (docs/protocol.md).

V validators, each a real bittensor Dendrite signed by its own wallet, run the 3.2.1 step: the task
(40/25/25/10) and one of the eight Chinese prompts come from the block number (12 s blocks), so the
validators whose step starts in the same block send the same request together; the mock context and a
60 s timeout; then each waits for the slowest other miner (--others), the scoring call (--api) and 12 s.
Validators start at random phases. --old-loop replays the earlier model instead (a random task, the next
request 12 s after the answer). The answers are checked against the contract until S seconds have passed.
By default it starts `python -m miner run --offline` itself (your --config, else the embedded
demo model) with the validators' hotkeys allowlisted, and scrapes its GET /metrics every 15 s as
Prometheus would: the miner's own counts are printed beside what the validators saw, with the scrapes'
times. Data on stdout (a table, or --json), progress on stderr.

    storynet-miner loadtest --validators 4 --seconds 600 [--config config.yaml] [--json]
    storynet-miner loadtest --axon 127.0.0.1:8091 --axon-hotkey SS58 --wallets DIR [--pid PID]
        (a miner already running: validator wallets are made in DIR; allowlist the hotkeys it prints)
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bittensor as bt
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backends.llama_lowlevel import Model
from miner import PROTOCOL_VERSION, PROTOCOLS, examples
from miner.activity import percentile
from miner.contract import VALIDATOR_TIMEOUT_S, answer_of, error_of
from miner.demo import free_port, make_wallet
from miner.errors import ConfigError, StartupError
from miner.neuron import no_public_ip_lookup
from miner import forwarded
from miner.protocol import StoryGenerationSynapse
from miner.score import score
from miner.service import GenerationSettings, TaskInputError, prepare
from miner.tasks import TASKS, ContractError

log = logging.getLogger("loadtest")

SLEEP_S = 12  # VALIDATOR_QUERY_INTERVAL
BLOCK_S = 12
FIRST_BLOCK = 5_000_000  # any block number: it only seeds the validators' choices
BURST_WINDOW_S = BLOCK_S  # identical requests this close together: the validators of one block
FULL_MARKS_S = 30
START_TIMEOUT_S = 600
RSS_WARM_S = 120  # the first requests grow the miner's memory (caches, buffers); it should stay flat after
# The client class per protocol: 3.2.1 validators query with their own strict declaration (3.2.0's takes the
# miner's lenient one, whose field types accept what 3.2.0 sent).
SYNAPSES = {"3.2.1": forwarded.StoryGenerationSynapse}


@dataclass
class Outcome:
    validator: int
    task: str
    prompt: str
    sent_s: float  # into the run
    kind: str  # valid, invalid, busy, error, no_answer
    seconds: float
    detail: str = ""
    chars: int = 0  # of the answer's compact JSON
    tokens: int = 0
    # As the validator rebuilds the answer and sends it for scoring (miner/forwarded.py): the task_type
    # forwarded (None: the rebuild raised, and every miner of that step got nothing), and what was wrong.
    forwarded_task_type: str | None = ""
    forward_problems: list[str] = field(default_factory=list)
    score: float = 0.0  # of 100, by the subnet's public rules (miner/score.py), as forwarded; 0 for errors


@dataclass
class Fault:
    at_s: float  # into the run
    kind: str  # kill (SIGKILL) or stall (SIGSTOP: the process stops, as a hung driver call stops it)
    pid: int


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_series: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, MiB)
    engine_rss_series: list[tuple[float, int, float]] = field(default_factory=list)  # (s, engine pid, MiB)
    faults: list[Fault] = field(default_factory=list)
    scrape_failures: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list, repr=False)  # answers so far: originality's history
    scrape_ms: list[float] = field(default_factory=list)
    metrics: str = ""  # the miner's last /metrics


def classify(task: str, fields: dict, response: StoryGenerationSynapse) -> tuple[str, str, dict | None]:
    output = response.output_data
    if not response.is_success or not isinstance(output, dict):
        return "no_answer", f"{response.dendrite.status_code} {response.dendrite.status_message}", None
    if error := error_of(output):  # by the kind the miner gives, not its words
        kind, text = error
        return ("busy" if kind == "busy" else "error"), f"{kind}: {text}"[:300], None
    answer = answer_of(output)
    try:
        spec, ctx = prepare(fields, GenerationSettings())
        spec.check(answer, ctx)
    except (ContractError, TaskInputError) as e:
        return "invalid", str(e)[:300], answer
    return "valid", "", answer


async def validator(n: int, wallet, axon_info, started: float, end: float, run: Run, count_tokens,
                    args) -> None:
    rng = random.Random(args.seed * 1000 + n)
    dendrite = bt.Dendrite(wallet=wallet)
    tasks, weights = zip(*examples.VALIDATOR_TASK_WEIGHTS.items())
    if not args.old_loop:  # validators started at different times: their steps have random phases
        await asyncio.sleep(rng.uniform(0, args.others + args.api + SLEEP_S))
    while (now := time.monotonic()) < end:
        if args.old_loop:
            task, prompt = rng.choices(tasks, weights)[0], rng.choice(examples.VALIDATOR_PROMPTS)
        else:
            task, prompt = examples.validator_task(FIRST_BLOCK + args.seed + int((now - started) // BLOCK_S))
        fields = examples.validator_fields(task, prompt, args.protocol)
        synapse = SYNAPSES.get(args.protocol, StoryGenerationSynapse)(**fields)
        response = (await dendrite.forward(axons=[axon_info], synapse=synapse, timeout=VALIDATOR_TIMEOUT_S,
                                           deserialize=False))[0]
        seconds = time.monotonic() - now
        kind, detail, answer = classify(task, fields, response)
        sent = forwarded.forward(response.output_data if response.is_success else None, task)
        text = json.dumps(answer, ensure_ascii=False, separators=(",", ":")) if answer else ""
        points = (score(sent.entry["output_data"], sent.task_type, sent.entry["generation_time"], run.history).total
                  if sent.entry is not None and kind in ("valid", "invalid") else 0.0)
        if answer:
            run.history.append(answer)
        run.outcomes.append(Outcome(n, task, prompt, round(now - started, 2), kind, round(seconds, 2), detail,
                                    len(text), count_tokens(text) if text else 0, sent.task_type, sent.problems,
                                    points))
        log.info("validator %d: %-10s %-9s %5.1f s, forwarded as %s %s", n, task, kind, seconds,
                 "a broken step" if sent.task_type is None else repr(sent.task_type), detail[:120])
        # 3.2.1: the query ends with the slowest miner, then the scoring service, then the sleep
        wait = SLEEP_S if args.old_loop else max(args.others - seconds, 0.0) + args.api + SLEEP_S
        await asyncio.sleep(min(wait, max(end - time.monotonic(), 0.0)))
    await dendrite.aclose_session()


def bursts(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """Identical requests (task, prompt) sent within BURST_WINDOW_S of the group's first: one block's."""
    groups: list[list[Outcome]] = []
    for o in sorted(outcomes, key=lambda o: o.sent_s):
        group = next((g for g in groups if (g[0].task, g[0].prompt) == (o.task, o.prompt)
                      and o.sent_s - g[0].sent_s <= BURST_WINDOW_S), None)
        if group is None:
            groups.append([o])
        else:
            group.append(o)
    return groups


def rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def start_miner(config: Path | None, workdir: Path, hotkeys: list[str],
                miner_log: Path | None) -> tuple[subprocess.Popen, str, str, str]:
    """`run --offline` with the validators allowlisted; returns (process, 'host:port', miner hotkey,
    its /metrics URL)."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) if config else {}
    wallet = make_wallet(str(workdir), "loadtest-miner")
    port, health_port = free_port(), free_port()
    raw = raw or {}
    raw.update(offline={"allowed_hotkeys": hotkeys}, health={**(raw.get("health") or {}), "port": health_port},
               wallet={"name": "loadtest-miner", "hotkey": "default", "path": str(workdir)},
               axon={**(raw.get("axon") or {}), "port": port})
    path = workdir / "loadtest-config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    log_path = miner_log or workdir / "miner.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "miner", "run", "--offline", "--config", str(path)]
                            + (["--log-level", "DEBUG"] if miner_log else []),
                            stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartupError(f"the miner exited with {proc.returncode} at start; the end of its log:\n"
                             + log_path.read_text()[-3000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}", wallet.hotkey.ss58_address, f"http://127.0.0.1:{health_port}/metrics"
        time.sleep(0.5)
    proc.kill()
    raise StartupError(f"the miner did not listen on port {port} within {START_TIMEOUT_S} s")


def model_path(config: Path | None, given: str | None) -> Path:
    if given:
        return Path(given)
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) if config else {}
    first = ((raw or {}).get("backends") or [{}])[0]
    if first.get("type") == "llama_cpp" and first.get("model_path"):
        return Path(first["model_path"]).expanduser()
    from models.embedded import embedded_model_path
    return embedded_model_path()


def summary(run: Run, seconds: float, validators: int, step: str) -> dict:
    outcomes = run.outcomes
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("valid", "invalid", "busy", "error", "no_answer")}
    answered = [o.seconds for o in outcomes if o.kind in ("valid", "invalid")]
    refusals = [o.seconds for o in outcomes if o.kind == "busy"]
    by_task = {t: {k: sum(o.kind == k and o.task == t for o in outcomes) for k in kinds} for t in TASKS}
    in_bursts = [o for g in bursts(outcomes) if len(g) > 1 for o in g]
    burst_answered = [o.seconds for o in in_bursts if o.kind in ("valid", "invalid")]
    answers = [o for o in outcomes if o.kind != "no_answer"]
    return {
        "validators": validators, "step": step, "seconds": round(seconds), "requests": len(outcomes), **kinds,
        "forwarded_intact": sum(not o.forward_problems for o in answers),
        "forwarded_wrong": sum(bool(o.forward_problems) and o.forwarded_task_type is not None for o in answers),
        "breaks_step": sum(o.forwarded_task_type is None for o in answers),
        "mean_score": round(statistics.mean(o.score for o in outcomes), 1) if outcomes else None,
        "mean_score_valid": round(statistics.mean(o.score for o in outcomes if o.kind == "valid"), 1)
        if any(o.kind == "valid" for o in outcomes) else None,
        "forwarded_as": {t: dict(Counter("(a broken step)" if o.forwarded_task_type is None else o.forwarded_task_type
                                         for o in answers if o.task == t)) for t in TASKS},
        "valid_share": round(kinds["valid"] / len(outcomes), 3) if outcomes else None,
        "answer_p50_s": percentile(answered, 0.5), "answer_p95_s": percentile(answered, 0.95),
        "answer_max_s": max(answered, default=None),
        "all_p95_s": percentile([o.seconds for o in outcomes], 0.95),
        "within_30s_share": round(sum(o.kind == "valid" and o.seconds <= FULL_MARKS_S for o in outcomes)
                                  / len(outcomes), 3) if outcomes else None,
        "refusal_max_s": max(refusals, default=None),
        "largest_burst": max(map(len, bursts(outcomes)), default=0),
        "burst_requests": len(in_bursts),
        "burst_kinds": {k: sum(o.kind == k for o in in_bursts) for k in kinds},
        "burst_answer_p50_s": percentile(burst_answered, 0.5),
        "burst_answer_p95_s": percentile(burst_answered, 0.95),
        "tokens_per_s": round(sum(o.tokens for o in outcomes) / seconds, 1),
        "chars_per_s": round(sum(o.chars for o in outcomes) / seconds, 1),
        "rss_start_mib": run.rss_start_mib and round(run.rss_start_mib),
        "rss_end_mib": run.rss_end_mib and round(run.rss_end_mib),
        "rss_series_mib": [[round(t), round(m)] for t, m in run.rss_series],
        "rss_after_warm_range": rss_range(run.rss_series),
        "engine_rss_series_mib": [[round(t), pid, round(m)] for t, pid, m in run.engine_rss_series],
        "faults": recoveries(run),
        "by_task": by_task,
        "miner_metrics": miner_view(run.metrics) if run.metrics else None,
        "scrapes": len(run.scrape_ms), "scrape_failures": run.scrape_failures,
        "scrape_p50_ms": percentile(run.scrape_ms, 0.5),
        "scrape_max_ms": max(run.scrape_ms, default=None),
        "mean_answer_s_by_task": {t: round(statistics.mean(xs), 1) for t in TASKS
                                  if (xs := [o.seconds for o in outcomes if o.task == t and o.kind == "valid"])},
    }


def rss_range(series: list[tuple[float, float]]) -> list[float] | None:
    """Lowest and highest RSS after the first RSS_WARM_S, relative to the first sample after it: a miner
    that leaks drifts up, one that does not stays within a few percent."""
    warm = [m for t, m in series if t >= RSS_WARM_S]
    if not warm:
        return None
    return [round(min(warm) / warm[0] - 1, 3), round(max(warm) / warm[0] - 1, 3)]


def print_table(s: dict, run: Run) -> None:
    print(f"validators {s['validators']} ({s['step']}), {s['seconds']} s, {s['requests']} requests: "
          f"{s['valid']} valid ({100 * (s['valid_share'] or 0):.1f}%), {s['invalid']} invalid, {s['busy']} busy, "
          f"{s['error']} errors, {s['no_answer']} no answer")
    print(f"forwarded for scoring as a 3.2.1 validator rebuilds them: {s['forwarded_intact']} of "
          f"{s['requests'] - s['no_answer']} answers intact with the step's task_type, {s['forwarded_wrong']} "
          f"changed on the way, {s['breaks_step']} the rebuild refuses (each costs every miner of its step); "
          "task_type forwarded, by the step's task: " + "; ".join(
              f"{task} as " + ", ".join(f"{sent!r} x{n}" for sent, n in counts.items())
              for task, counts in s["forwarded_as"].items() if counts))
    if s["mean_score"] is not None:
        print(f"score of 100 by the subnet's public rules (miner/score.py; the live narrative is an LLM judge): "
              f"mean {s['mean_score']} over every request (errors 0), {s['mean_score_valid']} over valid answers")
    fmt = lambda v: "-" if v is None else f"{v:.1f} s"  # noqa: E731
    print(f"answer latency p50 {fmt(s['answer_p50_s'])}, p95 {fmt(s['answer_p95_s'])}, max {fmt(s['answer_max_s'])}; "
          f"valid within 30 s: {100 * (s['within_30s_share'] or 0):.1f}% of requests; "
          f"slowest busy refusal {fmt(s['refusal_max_s'])}")
    burst = s["burst_kinds"]
    print(f"largest burst {s['largest_burst']} identical requests; {s['burst_requests']} requests came in bursts: "
          f"{burst['valid']} valid, {burst['invalid']} invalid, {burst['busy']} busy, {burst['error']} errors, "
          f"{burst['no_answer']} no answer; answer p50 {fmt(s['burst_answer_p50_s'])}, "
          f"p95 {fmt(s['burst_answer_p95_s'])}")
    print(f"served {s['tokens_per_s']} tokens/s ({s['chars_per_s']} characters/s); miner RSS "
          f"{s['rss_start_mib']} MiB at start, {s['rss_end_mib']} MiB at end")
    if s["rss_series_mib"]:
        drift = s["rss_after_warm_range"]
        print("miner RSS (s: MiB): " + ", ".join(f"{t}: {m}" for t, m in s["rss_series_mib"])
              + (f"; after {RSS_WARM_S} s within {100 * drift[0]:+.1f}% .. {100 * drift[1]:+.1f}%" if drift else ""))
    if s["miner_metrics"]:
        m = s["miner_metrics"]
        print(f"the miner's /metrics: {m['valid']:.0f} answered, {m['busy']:.0f} busy, {m['error']:.0f} errors "
              f"(the validators: {s['valid'] + s['invalid']} answered, {s['busy']} busy, {s['error']} errors); "
              f"{s['scrapes']} scrapes ({len(s['scrape_failures'])} failed), p50 {s['scrape_p50_ms']:.1f} ms, "
              f"max {s['scrape_max_ms']:.1f} ms"
              + (f"; GPU memory in use {m['gpu_used_mib']} MiB" if m["gpu_used_mib"] is not None else ""))
    if s["engine_rss_series_mib"]:
        print("engine process RSS (s pid: MiB): "
              + ", ".join(f"{t} {pid}: {m}" for t, pid, m in s["engine_rss_series_mib"]))
    if s["faults"]:
        restarts = (s["miner_metrics"] or {}).get("engine_restarts")
        print(f"faults injected: {len(s['faults'])} ("
              + ", ".join(f"{n} {k}" for k, n in Counter(f["kind"] for f in s["faults"]).items())
              + (f"); the miner's /metrics counts {restarts:.0f} engine restarts" if restarts is not None else ")"))
        for f in s["faults"]:
            again = f["valid_again_after_s"]
            print(f"  at {f['at_s']:.0f} s, {f['kind']} of process {f['pid']}: "
                  + (f"the first valid answer to a request sent after it ended {again} s later (the validators' "
                     f"next request included)" if again is not None else "no valid answer after it")
                  + "; until then " + (", ".join(f"{n} {k}" for k, n in f["until_then"].items()) or "nothing"))
    print(f"{'task':<11}" + "".join(f"{k:>10}" for k in ("valid", "invalid", "busy", "error", "no_answer"))
          + f"{'mean s':>9}")
    for task, counts in s["by_task"].items():
        mean = s["mean_answer_s_by_task"].get(task)
        print(f"{task:<11}" + "".join(f"{v:>10}" for v in counts.values()) + f"{fmt(mean):>9}")
    for o in run.outcomes:
        if o.kind != "valid":
            print(f"  {o.task} {o.kind} after {o.seconds} s: {o.detail}")
        if o.forward_problems and o.kind != "no_answer":
            print(f"  {o.task} forwarded as {o.forwarded_task_type!r}: {'; '.join(o.forward_problems)}")


async def sample_rss(pid: int | None, started: float, end: float, every: float, run: Run) -> None:
    while (now := time.monotonic()) < end:
        mib = rss_mib(pid)
        if mib is not None:
            run.rss_series.append((now - started, mib))
        engine = engine_pid(pid)
        if engine is not None and (mib := rss_mib(engine)) is not None:
            run.engine_rss_series.append((now - started, engine, mib))
        await asyncio.sleep(min(every, max(end - time.monotonic(), 0.0)))


def engine_pid(miner_pid: int | None) -> int | None:
    """The miner's llama.cpp engine process (backends/llama_runner.py), found among its children in /proc."""
    if miner_pid is None:
        return None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == miner_pid and b"backends.llama_runner" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


async def inject_faults(miner_pid: int | None, every: float, started: float, end: float, run: Run) -> None:
    """Every `every` seconds, alternately SIGKILL the engine process and SIGSTOP it (a decode that never
    returns: the supervisor must catch it); the last fault leaves `every` seconds to recover."""
    kinds = itertools.cycle(("kill", "stall"))
    while time.monotonic() + 2 * every <= end:
        await asyncio.sleep(every)
        pid = engine_pid(miner_pid)
        if pid is None:
            log.warning("fault: no engine process to hurt (restarting, or engine_process is false)")
            continue
        kind = next(kinds)
        os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        run.faults.append(Fault(round(time.monotonic() - started, 1), kind, pid))
        log.warning("fault %d: %s of the engine process %d", len(run.faults), kind, pid)


def recoveries(run: Run) -> list[dict]:
    """Per fault: the requests in flight or sent until the next valid answer, and when that answer came."""
    rows = []
    for f in run.faults:
        after = sorted((o for o in run.outcomes if o.sent_s + o.seconds >= f.at_s), key=lambda o: o.sent_s + o.seconds)
        first_valid = next((o for o in after if o.kind == "valid" and o.sent_s >= f.at_s), None)
        until = first_valid.sent_s + first_valid.seconds if first_valid else None
        hit = [o for o in after if until is None or o.sent_s + o.seconds < until]
        rows.append({**asdict(f), "valid_again_after_s": round(until - f.at_s, 1) if until is not None else None,
                     "until_then": dict(Counter(o.kind for o in hit))})
    return rows


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def scrape(url: str | None, end: float, every: float, run: Run) -> None:
    """GET /metrics as Prometheus would, timing each; the last one is kept (taken after the last answer)."""
    while url:
        started = time.perf_counter()
        try:
            run.metrics = await asyncio.to_thread(fetch, url)
        except OSError as e:  # a scrape that fails is a finding to report, not the end of the run
            run.scrape_failures.append(f"{time.monotonic() - end:+.0f} s from the end: {e}")
            log.warning("GET /metrics failed: %s", e)
        run.scrape_ms.append((time.perf_counter() - started) * 1e3)
        if time.monotonic() >= end:
            return
        await asyncio.sleep(min(every, max(end - time.monotonic(), 0.0)))


def miner_view(metrics: str) -> dict[str, float | None]:
    """What the miner says of itself in /metrics, read with prometheus-client's parser: its answers by
    outcome, and the GPU memory in use (None without GPU offload)."""
    view: dict[str, float | None] = {"valid": 0.0, "busy": 0.0, "error": 0.0, "gpu_used_mib": None,
                                     "engine_restarts": None}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "storynet_requests_total":
                view[sample.labels["outcome"]] += sample.value
            elif sample.name == "storynet_engine_restarts_total":
                view["engine_restarts"] = (view["engine_restarts"] or 0) + sample.value
            elif sample.name == "storynet_gpu_memory_used_bytes":
                view["gpu_used_mib"] = round(sample.value / 2**20)
    return view


async def load(args, wallets, axon_info, count_tokens, run: Run, pid: int | None, metrics_url: str | None) -> float:
    started = time.monotonic()
    end = started + args.seconds
    validators = asyncio.gather(*(validator(i, w, axon_info, started, end, run, count_tokens, args)
                                  for i, w in enumerate(wallets)))
    faults = inject_faults(pid, args.faults, started, end, run) if args.faults else asyncio.sleep(0)
    await asyncio.gather(sample_rss(pid, started, end, args.rss_every, run),
                         scrape(metrics_url, end, args.scrape_every, run), validators, faults)
    seconds = time.monotonic() - started
    if metrics_url:  # after the last answer: the miner's counts are complete
        await scrape(metrics_url, 0.0, 0.0, run)
    return seconds


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--validators", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--config", type=Path, help="the miner's YAML (default: built-in, embedded demo model)")
    parser.add_argument("--axon", help="HOST:PORT of a miner already running (default: start one)")
    parser.add_argument("--axon-hotkey", help="that miner's hotkey (ss58)")
    parser.add_argument("--wallets", type=Path, help="where to make the validators' wallets (with --axon)")
    parser.add_argument("--pid", type=int, help="that miner's process id, for its memory")
    parser.add_argument("--model", help="GGUF whose tokenizer counts the tokens served (default: the miner's)")
    parser.add_argument("--miner-log", type=Path, help="keep the started miner's log here (--log-level DEBUG)")
    parser.add_argument("--rss-every", type=float, default=60, help="seconds between samples of the miner's RSS")
    parser.add_argument("--scrape-every", type=float, default=15, help="seconds between GETs of the started "
                        "miner's /metrics")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--others", type=float, default=VALIDATOR_TIMEOUT_S,
                        help="seconds the slowest other miner keeps each validator's query open (default: the "
                             "60 s timeout)")
    parser.add_argument("--api", type=float, default=5.0, help="seconds each validator's scoring call takes")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=PROTOCOL_VERSION,
                        help="the validators' protocol: its request shapes and mock contexts")
    parser.add_argument("--old-loop", action="store_true",
                        help="the earlier model: a random task, the next request 12 s after each answer")
    parser.add_argument("--faults", type=float, metavar="SECONDS",
                        help="every SECONDS, SIGKILL the miner's llama.cpp engine process, then SIGSTOP it the next "
                             "time (a stall), and so on: the supervisor must catch each and serve again (off by default)")
    parser.add_argument("--json", action="store_true")


def command(args: argparse.Namespace) -> int:
    if args.axon and not (args.axon_hotkey and args.wallets):
        raise ConfigError("--axon needs --axon-hotkey and --wallets")
    if args.faults and args.axon and not args.pid:
        raise ConfigError("--faults with --axon needs --pid: the miner's process id, to find its engine process")
    vocab = Model(model_path(args.config, args.model), 0, vocab_only=True)
    count_tokens = lambda text: len(vocab.tokenize(text, add_special=False, parse_special=False))  # noqa: E731
    run = Run()
    with tempfile.TemporaryDirectory() as tmp, no_public_ip_lookup():
        where = args.wallets or Path(tmp)
        wallets = [make_wallet(str(where), f"validator-{i}") for i in range(args.validators)]
        hotkeys = [w.hotkey.ss58_address for w in wallets]
        proc, metrics_url = None, None
        if args.axon:
            address, miner_hotkey, pid = args.axon, args.axon_hotkey, args.pid
            print("allowlist these hotkeys (offline.allowed_hotkeys):", *hotkeys, sep="\n  ", file=sys.stderr)
        else:
            proc, address, miner_hotkey, metrics_url = start_miner(args.config, Path(tmp), hotkeys, args.miner_log)
            pid = proc.pid
        host, port = address.rsplit(":", 1)
        axon_info = bt.AxonInfo(version=0, ip=host, port=int(port), ip_type=4, hotkey=miner_hotkey, coldkey="")
        try:
            run.rss_start_mib = rss_mib(pid)
            seconds = asyncio.run(load(args, wallets, axon_info, count_tokens, run, pid, metrics_url))
            run.rss_end_mib = rss_mib(pid)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    vocab.close()
    step = "old loop" if args.old_loop else f"{args.protocol} step, others {args.others:g} s, api {args.api:g} s"
    result = summary(run, seconds, args.validators, step)
    if args.json:
        json.dump({"summary": result, "outcomes": [asdict(o) for o in run.outcomes]}, sys.stdout, indent=2,
                  ensure_ascii=False)
        print()
    else:
        print_table(result, run)
    return 0
