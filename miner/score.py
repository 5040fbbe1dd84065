"""`storynet-miner score FILE|-`: answers scored by the subnet's public scoring rules, per part and in total.

The validators' scoring service is private. Its recorded replies (docs/protocol.md) match the public modules
for technical, structure and content, scaled to 20 + 30 + 20 of 100, with a narrative part of 30 that is an
LLM judge's: this scores narrative by the public rule-based module instead, which the judge does not
follow (one recorded chapters answer: 9.0 from the service, 15.75 by the rules). Read it as a floor check
on what rules can see, not as the validators' number. Written here from the rules as the public modules
state them (ferdiina/storynet-subnet scoring/technical.py, structure.py, content.py; StorynetAI/storynet-
subnet scoring/narrative.py), with what the service is sent: no request and no context, so relevance is 0.

Input: answers as JSON, one per line or a JSON list: a miner's output_data (it names its task_type), or a
scoring entry {output_data, generation_time, task_type}. An answer earlier in the input is history for the
later ones' originality, as the service keeps recent answers. Data on stdout (a table, or --json).

    storynet-miner generate --task chapters --as-validator --repeat 10 > answers.jsonl
    storynet-miner score answers.jsonl
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miner.contract import MINER_FIELDS, TASK_TYPES
from miner.errors import ConfigError

# Each part's public maximum and its weight in the service's 100.
PARTS = {"technical": (30, 20), "structure": (40, 30), "content": (30, 20), "narrative": (30, 30)}
REQUIRED = {
    "blueprint": ("title", "genre", "setting", "core_conflict", "themes", "tone", "target_audience"),
    "characters": ("characters",),
    "story_arc": ("title", "description", "chapters", "arcs", "themes", "hooks"),
    "chapters": ("chapters",),
}
SENTENCE_MARKS = ("。", "！", "？", ".", "!", "?")
TRANSITIONS = ("然后", "接着", "随后", "因此", "所以", "但是", "然而", "不过", "首先", "其次", "最后", "同时", "此外",
               "另外", "总之", "then", "next", "however", "therefore", "finally", "meanwhile", "moreover")
# The stored module lists the ASCII quote three times, so each one counts three times: kept as it reads.
DIALOGUE = ('"', '"', '"', "「", "」", "『", "』", "说道", "问道", "回答", "said", "asked", "replied")
EMOTIONS = ("喜悦", "悲伤", "愤怒", "恐惧", "惊讶", "厌恶", "期待", "信任", "快乐", "痛苦", "紧张", "兴奋", "失望", "感动",
            "焦虑", "平静", "爱", "恨", "希望", "绝望", "勇敢", "害怕", "happy", "sad", "angry", "fear", "surprise",
            "love", "hate", "excited", "nervous", "hope", "despair", "brave", "scared")
ACTIONS = ("走", "跑", "看", "听", "说", "想", "做", "拿", "打", "抓", "walk", "run", "look", "listen", "speak", "think",
           "make", "take")


def _s(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _tiered(value: float, tiers: tuple[tuple[float, float], ...]) -> float:
    """The points of the first (threshold, points) whose threshold `value` passes (strictly)."""
    return next((points for threshold, points in tiers if value > threshold), 0.0)


# --- technical: JSON, the required fields and their types, time ---------------------------------------
def technical(answer: dict, task: str, seconds: float) -> float:
    required = REQUIRED[task]
    present = [k for k in required if k in answer]
    schema = 10.0 * len(present) / len(required) if len(present) < len(required) else 10.0 * _types(answer, task)
    timing = 10.0 if seconds <= 30 else max(0.0, 10.0 - (seconds - 30) * 0.33) if seconds <= 60 else 0.0
    return 10.0 + schema + timing


def _types(answer: dict, task: str) -> float:
    """The share of the task's type checks an answer passes (the public module's, counted as it counts them)."""
    if task in ("characters", "chapters"):
        items = answer.get("chapters" if task == "chapters" else "characters")
        if not isinstance(items, list):
            return 0.0
        if task == "characters":
            return min(len(items) / 5, 1.0)
        return float(all(isinstance(c, dict) and {"id", "title", "content"} <= c.keys() for c in items))
    kinds = {"blueprint": {"title": str, "genre": str, "setting": str, "core_conflict": str, "themes": list,
                           "tone": str, "target_audience": str},
             "story_arc": {"title": str, "description": str, "chapters": list, "arcs": dict, "themes": dict,
                           "hooks": dict}}[task]
    checks = [k for k in kinds if k in answer]
    right = sum(isinstance(answer[k], kinds[k]) for k in checks)
    if task == "blueprint" and isinstance(answer.get("themes"), list) and 2 <= len(answer["themes"]) <= 5:
        right += 0.5
    if task == "story_arc" and isinstance(answer.get("chapters"), list) and len(answer["chapters"]) == 12:
        right += 1.0
    return right / len(checks) if checks else 0.0


# --- structure: counts, lengths, the arc's order and acts, the choices ---------------------------------
def structure(answer: dict, task: str) -> float:
    return {"blueprint": _blueprint_structure, "characters": _characters_structure,
            "story_arc": _story_arc_structure, "chapters": _chapters_structure}[task](answer)


def _within(length: int, full: tuple[int, int], part: tuple[int, int]) -> float:
    return 5.0 if full[0] <= length <= full[1] else 3.0 if part[0] <= length <= part[1] else 0.0


def _blueprint_structure(a: dict) -> float:
    fields = 20.0 * sum(k in a for k in REQUIRED["blueprint"]) / len(REQUIRED["blueprint"])
    lengths = (_within(len(_s(a.get("setting"))), (50, 300), (30, 500))
               + _within(len(_s(a.get("core_conflict"))), (30, 200), (15, 300)))
    themes = a.get("themes")
    n = len(themes) if isinstance(themes, list) else -1
    return fields + lengths + (10.0 if 2 <= n <= 5 else 5.0 if 1 <= n <= 6 else 0.0)


def _characters_structure(a: dict) -> float:
    cast = a.get("characters")
    if not isinstance(cast, list):
        return 0.0
    count = 20.0 if len(cast) == 5 else 20.0 * len(cast) / 5 if len(cast) >= 3 else 0.0
    people = _dicts(cast)
    fields = ("id", "name", "archetype", "background", "motivation", "skills", "personality_traits")
    complete = statistics.mean(sum(k in p for k in fields) / len(fields) for p in people) if people else 0.0
    # a character with no relationships is left out of the mean, not counted as 0: the module's way
    ties = [1.0 if len(r) >= 2 else 0.5 for p in people if isinstance(r := p.get("relationships", {}), dict) and r]
    return count + 10.0 * complete + (10.0 * statistics.mean(ties) if ties else 0.0)


def _story_arc_structure(a: dict) -> float:
    chapters = a.get("chapters")
    if not isinstance(chapters, list):
        return 0.0
    count = 20.0 if len(chapters) == 12 else 20.0 * len(chapters) / 12 if len(chapters) >= 8 else 0.0
    progress = [c.get("storyProgress", 0) for c in _dicts(chapters)]
    numbers = [p for p in progress if isinstance(p, (int, float))]
    backwards = sum(b <= a_ for a_, b in zip([-1.0] + numbers, numbers))
    if backwards == 0 and len(numbers) == len(progress):
        order = 10.0
    else:
        order = 10.0 * (1 - backwards / len(chapters)) if backwards <= 2 else 0.0
    arcs = a.get("arcs")
    acts = ("act1", "act2a", "act2b", "act3")
    if isinstance(arcs, dict):
        whole = all(isinstance(arcs.get(k), dict) and isinstance(arcs[k].get("chapters"), list)
                    and len(arcs[k]["chapters"]) == 3 for k in acts)
        act_points = 10.0 if whole else 10.0 * sum(k in arcs for k in acts) / len(acts)
    else:
        act_points = 0.0
    return count + order + act_points


def _chapters_structure(a: dict) -> float:
    chapters = _dicts(a.get("chapters"))
    if not chapters:
        return 0.0
    lengths = [1.0 if 1000 <= n <= 3000 else 0.7 if 800 <= n < 1000 else 0.8 if 3000 < n <= 3500
               else 0.4 if 500 <= n < 800 else None for n in (len(_s(c.get("content"))) for c in chapters)]
    lengths = [x for x in lengths if x is not None]
    choices = [c["choices"] for c in chapters if isinstance(c.get("choices"), list)]
    counts = [1.0 if 2 <= len(ch) <= 4 else 0.3 if len(ch) == 1 else 0.6 if len(ch) > 4 else None for ch in choices]
    counts = [x for x in counts if x is not None]
    diversity = []
    for ch in choices:
        outcomes = [json.dumps(c["consequences"], sort_keys=True) for c in _dicts(ch)
                    if isinstance(c.get("consequences"), dict)]
        if len(ch) >= 2 and outcomes:
            diversity.append(len(set(outcomes)) / len(outcomes))
    return (20.0 * statistics.mean(lengths) if lengths else 0.0) + (10.0 * statistics.mean(counts) if counts else 0.0) \
        + (10.0 * statistics.mean(diversity) if diversity else 0.0)


# --- content: relevance (nothing to compare with), fluency, originality ---------------------------------
def prose(answer: dict, task: str) -> str:
    """The prose content's fluency reads."""
    if task == "blueprint":
        return _s(answer.get("setting")) + " " + _s(answer.get("core_conflict"))
    key, field = {"characters": ("characters", "background"), "story_arc": ("chapters", "description"),
                  "chapters": ("chapters", "content")}[task]
    return "".join(_s(item.get(field)) + " " for item in _dicts(answer.get(key)))


def fluency(answer: dict, task: str) -> float:
    text = prose(answer, task)
    if not text.strip():
        return 0.0
    words = text.split()  # by whitespace, as the module counts: Chinese prose has few such words
    points = 2.0 if any(m in text for m in SENTENCE_MARKS) else 0.0
    distinct = len(set(words)) / len(words) if words else 0.0
    points += 3.0 if distinct > 0.6 else 1.5 if distinct > 0.4 else 0.0
    points += _tiered(len(words), ((500, 3.0), (300, 1.5)) if task == "chapters" else ((100, 3.0), (50, 1.5)))
    sentences = [s.strip() for s in text.replace("。", ".").split(".") if s.strip()]
    if len(sentences) > 3 and 10 < statistics.mean(len(s.split()) for s in sentences) < 30:
        points += 2.0
    return min(points, 10.0)


def _bigrams(value: Any) -> set[str]:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return {text[i:i + 2] for i in range(len(text) - 1)}


def originality(answer: dict, history: list[dict]) -> float:
    """5 when nothing recent is alike; a copy (the same answer among the last 100, or a bigram Jaccard of 0.9 or
    more with one of the last 20) 0."""
    if answer in history[-100:]:
        return 0.0
    mine = _bigrams(answer)
    alike = max((len(mine & b) / len(mine | b) for b in map(_bigrams, history[-20:]) if mine and b), default=0.0)
    return 5.0 if alike < 0.8 else 2.0 if alike < 0.9 else 0.0


# --- narrative, by the public rules (the live score is an LLM judge's) -----------------------------------
def narrative_text(answer: dict, task: str) -> str:
    if task == "blueprint":
        themes = answer.get("themes")
        parts = [_s(answer.get(k)) for k in ("title", "genre", "setting", "core_conflict")]
        theme_text = " ".join(t for t in themes if isinstance(t, str)) if isinstance(themes, list) else ""
        return "\n".join(parts + [theme_text])
    if task == "characters":
        return "\n".join(f"{_s(c.get('name'))} {_s(c.get('background'))} {_s(c.get('motivation'))}"
                         for c in _dicts(answer.get("characters"))[:5])
    if task == "story_arc":
        chapters = _dicts(answer.get("chapters"))[:12]
        return "\n".join(f"{_s(c.get('title'))} {_s(c.get('description'))}" for c in chapters)
    return "\n".join(_s(c.get("content")) for c in _dicts(answer.get("chapters"))[:3])


def narrative(answer: dict, task: str) -> float:
    text = narrative_text(answer, task)
    if len(text) < 50:
        return 5.0
    return (_flow(text) + _dialogue(text) + _vocabulary(text) + _consistency(answer, task))


def _flow(text: str) -> float:
    points = _tiered(len(text), ((1000, 3.0), (500, 2.5), (200, 1.5)))
    paragraphs = [p for p in text.split("\n") if p.strip()]
    points += 1.5 if len(paragraphs) >= 3 else 0.75 if len(paragraphs) == 2 else 0.0
    sentences = [s.strip() for s in re.split(r"[。！？.!?]", text) if s.strip()]
    if len(sentences) >= 3:
        lengths = [len(s) for s in sentences]
        spread = statistics.pvariance(lengths)
        points += 1.5 if spread > 100 else 0.75 if spread > 50 else 0.0
    points += _tiered(sum(w in text for w in TRANSITIONS), ((4, 1.5), (1, 0.75)))
    return min(points, 7.5)


def _dialogue(text: str) -> float:
    points = _tiered(sum(text.count(m) for m in DIALOGUE), ((9, 2.5), (4, 1.5), (1, 0.75)))
    points += _tiered(sum(w in text for w in EMOTIONS), ((7, 2.5), (3, 1.5), (1, 0.75)))
    points += _tiered(sum(text.count(w) for w in ACTIONS), ((14, 2.5), (7, 1.5), (2, 0.75)))
    return min(points, 7.5)


def _vocabulary(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    points = _tiered(len(set(chars)) / len(chars), ((0.4, 2.5), (0.3, 1.5), (0.2, 0.75))) if chars else 0.0
    words = re.findall(r"[\w\u4e00-\u9fff]+", text)
    if len(words) >= 10:
        points += _tiered(len(set(words)) / len(words), ((0.6, 2.5), (0.4, 1.5), (0.3, 0.75)))
    if len(words) >= 6:
        repeat = max(Counter(zip(words, words[1:], words[2:])).values())
        points += 2.5 if repeat <= 2 else 1.5 if repeat <= 4 else 0.75 if repeat <= 6 else 0.0
    return min(points, 7.5)


def _consistency(a: dict, task: str) -> float:
    if task == "blueprint":
        filled = sum(bool(a.get(k)) for k in ("title", "genre", "setting", "core_conflict", "themes")) / 5
        themes = a.get("themes")
        n = len(themes) if isinstance(themes, list) else 0
        return min(5.0 * filled + (2.5 if n >= 2 else 1.25 if n == 1 else 0.0), 7.5)
    if task == "characters":
        cast = a.get("characters") if isinstance(a.get("characters"), list) else []
        whole = sum(all(c.get(k) for k in ("name", "background", "motivation")) for c in _dicts(cast)[:5])
        return min((2.5 if len(cast) >= 5 else 1.5 if len(cast) >= 3 else 0.0) + 5.0 * whole / 5, 7.5)
    chapters = a.get("chapters") if isinstance(a.get("chapters"), list) else []
    if task == "story_arc":
        whole = sum(bool(c.get("title")) and bool(c.get("description")) for c in _dicts(chapters)[:12])
        count = 2.5 if len(chapters) >= 12 else 1.5 if len(chapters) >= 8 else 0.75 if len(chapters) >= 5 else 0.0
        return min(count + (5.0 * whole / min(len(chapters), 12) if chapters else 0.0), 7.5)
    if not chapters:
        return 0.0
    length = sum(len(_s(c.get("content"))) for c in _dicts(chapters))
    with_choices = sum(bool(c.get("choices")) for c in _dicts(chapters))
    return min(_tiered(length, ((2000, 3.75), (1000, 2.5), (500, 1.25)))
               + (3.75 if with_choices >= len(chapters) else 1.875 if with_choices else 0.0), 7.5)


# --- what the prose looks like: the facts the scores rest on ------------------------------------------------
PROSE_FIELDS = {"blueprint": (("setting",), ("core_conflict",)),
                "characters": (("characters", "background"), ("characters", "motivation")),
                "story_arc": (("chapters", "description"),), "chapters": (("chapters", "content"),)}
ENDS = tuple(".!?。！？…」』”’\"')）")
THRESHOLDS = (200, 500, 1000, 2000)  # of the narrative rules' text (a chapters answer's 2,000: all its content)


def prose_fields(answer: dict, task: str) -> list[str]:
    found = []
    for path in PROSE_FIELDS[task]:
        if len(path) == 1:
            found.append(_s(answer.get(path[0])))
        else:
            found += [_s(item.get(path[1])) for item in _dicts(answer.get(path[0]))]
    return found


def facts(answer: Any, task: str) -> dict[str, Any] | None:
    """Paragraphs per chapter, the share of judged prose fields that end on a full sentence, and which of the
    rules' length thresholds the narrative text passes; None for an error answer."""
    if not isinstance(answer, dict) or "error" in answer or task not in TASK_TYPES:
        return None
    fields = [f.rstrip() for f in prose_fields(answer, task)]
    text = narrative_text(answer, task)
    found = {"sentence_ends": sum(f.endswith(ENDS) for f in fields) / len(fields) if fields else 0.0,
             "above": {n: len(text) > n for n in THRESHOLDS}}
    if task == "chapters":
        found["paragraphs"] = [len([p for p in _s(c.get("content")).split("\n") if p.strip()])
                               for c in _dicts(answer.get("chapters"))]
    return found


# --- the whole --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    task: str
    technical: float  # each part scaled to its weight of 100, as the service reports them
    structure: float
    content: float
    narrative: float  # by the public rules, not the live judge
    total: float
    note: str = ""


def score(answer: Any, task: str, seconds: float, history: list[dict]) -> Score:
    """One answer (output_data, the miner's fields included or not) of task `task`."""
    if not isinstance(answer, dict) or "error" in answer or task not in TASK_TYPES:
        why = "an error answer" if isinstance(answer, dict) and "error" in answer else f"no task {task!r} to score as"
        return Score(task or "?", 0.0, 0.0, 0.0, 0.0, 0.0, why)
    body = {k: v for k, v in answer.items() if k not in MINER_FIELDS}
    raw = {"technical": technical(body, task, seconds), "structure": structure(body, task),
           "content": fluency(body, task) + originality(body, history), "narrative": narrative(body, task)}
    scaled = {part: round(min(raw[part], top) * weight / top, 2) for part, (top, weight) in PARTS.items()}
    return Score(task, **scaled, total=round(sum(scaled.values()), 2))


def read_answers(text: str) -> list[dict]:
    """Answers from JSON lines or one JSON list (or object); ConfigError naming what cannot be read."""
    text = text.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"line {n} is not JSON ({e.msg}); give JSON lines or one JSON list") from None
    return [item for item in items if isinstance(item, dict)]


def score_all(items: list[dict]) -> list[Score]:
    history: list[dict] = []
    scores = []
    for item in items:
        if "output_data" in item:  # a scoring entry, as the validator sends it
            answer, task, seconds = item["output_data"], item.get("task_type", ""), item.get("generation_time", 0.0)
        else:
            answer, task, seconds = item, item.get("task_type", ""), item.get("generation_time", 0.0)
        scores.append(score(answer, task, float(seconds or 0.0), history))
        if isinstance(answer, dict):
            history.append({k: v for k, v in answer.items() if k not in MINER_FIELDS})
    return scores


def prose_summary(items: list[dict]) -> dict[str, dict[str, Any]]:
    """Per task: answers, mean paragraphs per chapter, the share of prose fields ending on a sentence, and
    the share of answers above each of the rules' length thresholds."""
    by_task: dict[str, list[dict]] = {}
    for item in items:
        answer = item.get("output_data", item)
        task = item.get("task_type", "")
        if (found := facts(answer, task)) is not None:
            by_task.setdefault(task, []).append(found)
    summary = {}
    for task, found in by_task.items():
        row: dict[str, Any] = {"answers": len(found),
                               "sentence_ends": round(statistics.mean(f["sentence_ends"] for f in found), 3),
                               "above": {n: round(statistics.mean(f["above"][n] for f in found), 3)
                                         for n in THRESHOLDS}}
        if task == "chapters":
            counts = [n for f in found for n in f["paragraphs"]]
            row["paragraphs_mean"] = round(statistics.mean(counts), 2) if counts else 0.0
            row["paragraphs_min"] = min(counts, default=0)
        summary[task] = row
    return summary


def means(scores: list[Score]) -> dict[str, dict[str, float]]:
    """Per task and for all: the mean of each part and of the total."""
    groups = {"all": scores, **{t: [s for s in scores if s.task == t] for t in TASK_TYPES}}
    return {name: {part: round(statistics.mean(getattr(s, part) for s in group), 2)
                   for part in (*PARTS, "total")} | {"answers": len(group)}
            for name, group in groups.items() if group}


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="answers as JSON lines or a JSON list; - for stdin")
    p.add_argument("--json", action="store_true")


def command(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{args.file}: cannot read it ({e.strerror})") from None
    items = read_answers(text)
    scores = score_all(items)
    if args.json:
        json.dump({"answers": [asdict(s) for s in scores], "means": means(scores), "prose": prose_summary(items)},
                  sys.stdout, indent=2)
        print()
        return 0
    columns = ("technical", "structure", "content", "narrative", "total")
    print(f"{'#':>3} {'task':<11}" + "".join(f"{c:>11}" for c in columns) + "  note")
    for n, s in enumerate(scores, 1):
        print(f"{n:>3} {s.task:<11}" + "".join(f"{getattr(s, c):>11.2f}" for c in columns) + f"  {s.note}")
    for name, row in means(scores).items():
        print(f"mean {name:<10}" + "".join(f"{row[c]:>11.2f}" for c in columns) + f"  ({row['answers']} answers)")
    print(f"of {', '.join(f'{c} {w}' for c, (_, w) in PARTS.items())}; narrative by the public rules: the "
          f"service's is an LLM judge this cannot reproduce, and relevance is 0 (no request is forwarded)")
    for task, row in prose_summary(items).items():
        above = ", ".join(f">{n}: {share:.0%}" for n, share in row["above"].items())
        paragraphs = (f"; paragraphs per chapter {row['paragraphs_mean']} (fewest {row['paragraphs_min']})"
                      if "paragraphs_mean" in row else "")
        print(f"prose {task:<10} {row['answers']} answers: {row['sentence_ends']:.0%} of prose fields end on a "
              f"sentence; narrative text above {above}{paragraphs}")
    return 0
