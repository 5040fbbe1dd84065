"""Answers sized to fit the clock, by construction.

A task's JSON schema gives every string a floor (minLength) and a ceiling (maxLength), and some arrays
a range of items. Here the ceilings shrink toward the floors, all by one scale, until the worst case
(every string at its maximum, every optional item present, forced text included) fits the time left
at the speed this backend measured for the load it will run under. llguidance stops each string at
its maxLength, so the plan holds whatever the model writes. No library sizes output by time, hence this.
"""
from __future__ import annotations

import json
import math
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterator

PLAN_MARGIN = 1.05  # step times are running averages (token counts have their own high estimate: CharCost)
EMA = 0.1  # weight of a new observation in the running prompt speed
LINE_DECAY = 0.998  # weight an older decode step keeps per newer one (about the last 500 steps count)
MIN_SPREAD_CELLS = 128  # steps must span about this much context before a slope is read off them


UNSCORED = "x-unscored"  # on a schema node: no scorer reads it (docs/protocol.md), so it shrinks first
LEAST = "x-least"  # on a string: the length it may fall to below minLength, when not even that fits in time


def shrink(schema: dict[str, Any], scale: float) -> dict[str, Any]:
    """A copy whose maxLength and maxItems lie `scale` of the way from their floors (0) to themselves (1).
    Where the schema marks nodes UNSCORED or gives strings a LEAST length, the scale runs in three stages:
    from 1 down to 2/3 the unscored parts shrink to their floors while the rest stay whole; from 2/3 to 1/3
    the rest shrink to their floors (minLength: lengths the scoring rules reward); from 1/3 to 0 the strings
    with a LEAST fall from their floors to it (the contract's own minimum), so an answer that must be small
    to arrive in time still arrives. Rebuilt by hand rather than with copy.deepcopy: admission shrinks a
    schema about ten times a request, and deepcopy's bookkeeping was half of admission's time."""
    staged = UNSCORED in (dumped := json.dumps(schema)) or LEAST in dumped

    def walk(node: Any, unscored: bool) -> Any:
        if isinstance(node, list):
            return [walk(value, unscored) for value in node]
        if not isinstance(node, dict):
            return node
        unscored = unscored or bool(node.get(UNSCORED))
        out = {key: walk(value, unscored) for key, value in node.items()}
        share = (min(max(3 * scale - (2 if unscored else 1), 0.0), 1.0)) if staged else scale
        for lo_key, hi_key in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if hi_key in out:
                lo = out.get(lo_key, 0)
                out[hi_key] = lo + math.floor((out[hi_key] - lo) * share)
        if LEAST in out and staged and scale < 1 / 3:  # below the floors: toward the contract's minimum
            least = out[LEAST]
            out["minLength"] = out["maxLength"] = least + math.floor((out["minLength"] - least) * 3 * scale)
        return out

    return walk(schema, False)


def skeleton(schema: Any) -> Any:
    """The biggest answer's skeleton: every key and item, strings empty. What is left is forced text."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        return {key: skeleton(sub) for key, sub in schema.get("properties", {}).items()}
    if kind == "array":
        prefix = schema.get("prefixItems") or []
        n = schema.get("maxItems", len(prefix))
        return [skeleton(prefix[i] if i < len(prefix) else schema.get("items")) for i in range(n)]
    if kind == "string":
        return ""
    return 0


def strings_in(value: Any) -> Iterator[str]:
    """The strings of a JSON value (an answer), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def value_chars(text: str) -> str:
    """The string values of JSON text that may stop anywhere (an answer cut off by its token cap), joined:
    keys left out, each escape one character. What the answer's sampled tokens were spent on."""
    values: list[str] = []
    current: list[str] = []
    inside, i = False, 0
    while i < len(text):
        ch = text[i]
        if not inside:
            if ch == '"':
                inside, current = True, []
            elif ch == ":" and values:
                values.pop()  # the string before a colon was a key
        elif ch == "\\":
            current.append(ch)
            i += 6 if text[i + 1:i + 2] == "u" else 2
            continue
        elif ch == '"':
            values.append("".join(current))
            inside = False
        else:
            current.append(ch)
        i += 1
    return "".join(values) + ("".join(current) if inside else "")


def _strings(schema: Any) -> tuple[float, int, int]:
    """(characters of every string at its maximum, number of strings, optional items) at maximum size;
    infinite characters when a string has no maxLength."""
    if not isinstance(schema, dict) or "const" in schema:
        return 0, 0, 0
    kind = schema.get("type")
    if kind == "string":
        return schema.get("maxLength", math.inf), 1, 0
    parts: list[Any] = []
    optional = 0
    if kind == "object":
        parts = list(schema.get("properties", {}).values())
    elif kind == "array":
        prefix = schema.get("prefixItems") or []
        n = schema.get("maxItems", len(prefix))
        parts = [prefix[i] if i < len(prefix) else schema.get("items") for i in range(n)]
        optional = n - schema.get("minItems", n)
    chars = strings = 0
    for part in parts:
        c, s, o = _strings(part)
        chars, strings, optional = chars + c, strings + s, optional + o
    return chars, strings, optional


@dataclass(frozen=True)
class Cost:
    """Tokens of the largest answer a schema allows (sampled is infinite when a string is unbounded)."""
    sampled: float  # chosen by the model: string text, each string's end, each optional item
    forced: int  # dictated by the schema (keys, ids, punctuation), evaluated in batches

    @property
    def tokens(self) -> float:
        return self.sampled + self.forced

    @property
    def bounded(self) -> bool:
        return not math.isinf(self.sampled)


def worst_case(schema: dict[str, Any], tokens_per_char: float, count_tokens: Callable[[str], int]) -> Cost:
    chars, strings, optional = _strings(schema)
    forced = json.dumps(skeleton(schema), ensure_ascii=False, separators=(",", ":"))
    sampled = math.ceil(chars * tokens_per_char) if not math.isinf(chars) else math.inf
    return Cost(sampled=sampled + strings + optional, forced=count_tokens(forced))


class _StepLine:
    """Seconds a step takes at one number of sequences, as a line over the KV cells they attend to:
    exponentially weighted least squares, so recent steps count most."""

    def __init__(self, seconds: float, cells: float):
        self.w, self.x, self.y, self.xx, self.xy = 1.0, cells, seconds, cells * cells, cells * seconds

    def add(self, cells: float, seconds: float) -> None:
        d = LINE_DECAY
        self.w, self.x, self.y = self.w * d + 1, self.x * d + cells, self.y * d + seconds
        self.xx, self.xy = self.xx * d + cells * cells, self.xy * d + cells * seconds

    def slope(self) -> float | None:
        """Seconds per cell, once the steps seen span enough context to tell; never negative."""
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var < MIN_SPREAD_CELLS ** 2:
            return None
        return max((self.xy / self.w - mx * my) / var, 0.0)

    def at(self, cells: float, slope: float) -> float:
        return max(self.y / self.w + slope * (cells - self.x / self.w), 1e-6)


class Speed:
    """The engine's one time model: what it measured of itself. A step is everything the engine does for one
    token of each decoding sequence (llama_decode until its results are ready, then drawing each token);
    seconds per step when n sequences decode together, prompt tokens a second, and what a schema-forced
    token costs riding along in a step. A step grows with the KV cells its sequences attend to (on 2 cores
    12.5 ms at 300 cells, 19.6 ms at 2500), so each n keeps a line over cells. Seeded by a warm-up, then
    fitted to every step served. Planning an answer, keeping a running answer's promise and guessing when a
    slot frees all price time here (seconds, planned)."""

    def __init__(self, prefill_tps: float, step_s: dict[int, float], cells: dict[int, float] | None = None,
                 forced_s: float | None = None):
        self._lock = threading.Lock()
        self.prefill_tps = prefill_tps
        self.forced_s = forced_s if forced_s is not None else 1 / prefill_tps
        self._lines = {n: _StepLine(t, (cells or {}).get(n, 0.0)) for n, t in step_s.items()}

    def per_cell(self) -> float:
        """Seconds a step gains per KV cell attended to: what the lines that can tell agree on."""
        slopes = [s for s in (line.slope() for line in self._lines.values()) if s is not None]
        return sum(slopes) / len(slopes) if slopes else 0.0

    def step_s(self, n: int, cells: float = 0.0) -> float:
        """Seconds per step at n sequences attending to `cells` KV cells in all: measured, or on the line
        through the nearest measured numbers of sequences."""
        with self._lock:
            shared = self.per_cell()
            known = sorted((k, line.at(cells, line.slope() if line.slope() is not None else shared))
                           for k, line in self._lines.items())
        exact = dict(known)
        if n in exact:
            return exact[n]
        if len(known) == 1:
            return known[0][1] * n  # one point: assume no batching gain
        below = [p for p in known if p[0] < n][-1:] or known[:1]
        above = [p for p in known if p[0] > n][:1] or known[-1:]
        (n0, t0), (n1, t1) = (below[0], above[0]) if below[0] != above[0] else (known[-2], known[-1])
        return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), min(t0, t1))

    def observe_step(self, n: int, seconds: float, cells: float = 0.0) -> None:
        with self._lock:
            if n in self._lines:
                self._lines[n].add(cells, seconds)
            else:
                self._lines[n] = _StepLine(seconds, cells)

    def observe_forced(self, n: int, tokens: int, seconds: float, cells: float = 0.0) -> None:
        """A step of n sequences that also evaluated `tokens` forced tokens: what it took beyond a plain step."""
        extra = max(seconds - self.step_s(n, cells), 0.0) / tokens
        with self._lock:
            self.forced_s += EMA * (extra - self.forced_s)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self.prefill_tps += EMA * (tokens / seconds - self.prefill_tps)

    def seconds(self, cost: Cost, prompt_tokens: int, n: int, cells: float | None = None) -> float:
        """The time of an answer (or what is left of one) at n sequences: its sampled tokens a step each,
        its forced ones riding along, the prompt tokens still to evaluate. The steps attend to `cells` KV
        cells at first (default: n prompts like this one), and each sequence grows by about the answer's
        length, so its steps cost, on average, what a step costs halfway."""
        start = n * prompt_tokens if cells is None else cells
        middle = start + n * cost.tokens / 2
        return cost.sampled * self.step_s(n, middle) + cost.forced * self.forced_s + prompt_tokens / self.prefill_tps

    def planned(self, cost: Cost, prompt_tokens: int, n: int, prefill_share: float,
                cells: float | None = None) -> float:
        """What an answer is planned to take: its time at n sequences, with the margin, while other
        requests' prompts take `prefill_share` of the time."""
        return self.seconds(cost, prompt_tokens, n, cells) * PLAN_MARGIN / (1 - prefill_share)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lines = sorted(self._lines.items())
            per_cell = self.per_cell()
        return {"prefill_tok_s": round(self.prefill_tps, 1),
                "decode_tok_s_by_sequences": {n: round(n / line.at(line.x / line.w, 0.0), 1) for n, line in lines},
                "step_us_per_kv_cell": round(per_cell * 1e6, 2), "forced_ms_per_token": round(self.forced_s * 1e3, 3)}


class Fill:
    """How much of its planned worst case an answer writes, per schema shape (a blueprint writes a tenth of
    what it may): a running share, with a margin, for guessing when a running answer will end."""

    UNKNOWN, MARGIN = 0.8, 0.2

    def __init__(self):
        self._lock = threading.Lock()
        self._share: dict[tuple[str, ...], float] = {}

    def expected(self, shape: tuple[str, ...]) -> float:
        with self._lock:
            return min(self._share.get(shape, self.UNKNOWN) + self.MARGIN, 1.0)

    def learn(self, shape: tuple[str, ...], written: int, worst: float) -> None:
        with self._lock:
            old = self._share.get(shape, self.UNKNOWN)
            self._share[shape] = old + 0.3 * (written / worst - old)


def script_of(text: str) -> str:
    """The writing system most of the text's letters belong to (CJK, LATIN, CYRILLIC...): the first word of
    their Unicode names."""
    counts: dict[str, int] = {}
    for ch in text[:2000]:
        if ch.isalpha():
            script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
            counts[script] = counts.get(script, 0) + 1
    return max(counts, key=counts.get) if counts else "UNKNOWN"


class CharCost:
    """Tokens a character of answer text costs on this model, per writing system: measured on a sample of
    the requested language (Chinese costs SmolLM2 1.8 tokens a character, Llama-3 0.8), then learned from
    the strings of the answers served (those cut off past their plan too: the plan was low), filed under the
    script they were written in (a model asked for Chinese may answer in English: that says nothing of what
    Chinese costs). Plans use the high estimate: the running mean plus Z spreads of how far answers fell
    from it, so about 1 answer in 20 costs more than planned (with the mean alone, every other one). Z is
    above the normal 1.645 because mean and spread are estimates themselves (tests/test_sizing.py)."""

    Z = 1.8
    MEAN_EMA, SPREAD_EMA, MIN_CHARS = 0.3, 0.1, 200  # answers shorter than this say little
    START_SPREAD = 0.1  # of the first figure, until answers show theirs
    # Of the first figure, what plans keep to whatever the answers say: not far below it, so an answer written
    # at the sample's cost still fits its runaway cap (1.5x the plan); far above, for a small model that
    # writes lists of numbers at three times what prose costs.
    RANGE = (0.8, 4.0)

    def __init__(self, count_tokens: Callable[[str], int]):
        self._count = count_tokens
        self._lock = threading.Lock()  # requests arrive on many threads
        self._by_script: dict[str, list[float]] = {}  # script -> [first figure, mean, mean squared miss]

    def _entry(self, script: str, first: Callable[[], float]) -> list[float]:
        with self._lock:
            entry = self._by_script.get(script)
        if entry is None:
            figure = first()
            with self._lock:
                entry = self._by_script.setdefault(script, [figure, figure, (figure * self.START_SPREAD) ** 2])
        return entry

    def _of_sample(self, sample: str) -> list[float]:
        return self._entry(script_of(sample), lambda: self._count(sample) / len(sample))

    def _in_range(self, first: float, value: float) -> float:
        return min(max(value, first * self.RANGE[0]), first * self.RANGE[1])

    def mean(self, sample: str) -> float:
        first, mean, _ = self._of_sample(sample)
        return self._in_range(first, mean)

    def high(self, sample: str) -> float:
        first, mean, miss = self._of_sample(sample)
        return self._in_range(first, mean + self.Z * math.sqrt(miss))

    def learn(self, text: str, sampled_tokens: int) -> None:
        """What the model samples for its answers' strings (commoner characters, a Latin id here and there) is
        what answers will cost, more than a hand-written sample says. Mean and spread follow the answers
        unbounded and only the plan keeps to RANGE: a spread measured from a held mean would count the
        hold as scatter, and answers cheaper than the range allows would raise the plan."""
        if len(text) < self.MIN_CHARS:
            return
        seen = sampled_tokens / len(text)
        entry = self._entry(script_of(text), lambda: seen)
        with self._lock:
            _, mean, miss = entry
            diff = seen - mean
            entry[1] = mean + self.MEAN_EMA * diff
            entry[2] = miss + self.SPREAD_EMA * (diff * diff - miss)


@dataclass(frozen=True)
class Fit:
    scale: float  # 1.0: full size; 0.0: every bound at its floor
    schema: dict[str, Any]
    cost: Cost
    seconds: float  # the worst case's estimated time, prompt included
    past_target: bool  # even the floors miss the target; they still make the hard limit


def fit_schema(schema: dict[str, Any], seconds_of: Callable[[dict[str, Any]], tuple[Cost, float]],
               target_s: float, hard_s: float, steps: int = 8) -> Fit | None:
    """The largest scale whose worst case fits target_s; the floors if only hard_s fits; None if not even that."""
    cost, seconds = seconds_of(schema)
    if seconds <= target_s:
        return Fit(1.0, schema, cost, seconds, False)
    floor = shrink(schema, 0.0)
    floor_cost, floor_seconds = seconds_of(floor)
    if floor_seconds > target_s:
        return Fit(0.0, floor, floor_cost, floor_seconds, True) if floor_seconds <= hard_s else None
    best = Fit(0.0, floor, floor_cost, floor_seconds, False)
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        sized = shrink(schema, mid)
        cost, seconds = seconds_of(sized)
        if seconds <= target_s:
            lo, best = mid, Fit(mid, sized, cost, seconds, False)
        else:
            hi = mid
    return best
