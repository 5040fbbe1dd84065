"""Pieces every task spec uses: errors, the answer language, schema builders and contract checks."""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from backends.constraint import ENDS_ON_SENTENCE
from backends.sizing import LEAST, UNSCORED

# Scripts that name a language unambiguously; anything else is "the request's language".
_SCRIPTS: list[tuple[str, str]] = [
    (r"[\u3040-\u30ff]", "Japanese"),
    (r"[\uac00-\ud7af]", "Korean"),
    (r"[\u4e00-\u9fff]", "Simplified Chinese"),
    (r"[\u0400-\u04ff]", "Russian"),
    (r"[\u0600-\u06ff]", "Arabic"),
    (r"[\u0900-\u097f]", "Hindi"),
    (r"[\u0e00-\u0e7f]", "Thai"),
]


def detect_language(text: str) -> str | None:
    for pattern, language in _SCRIPTS:
        if re.search(pattern, text):
            return language
    return None


def answer_language(user_input: str, configured: str) -> str | None:
    return configured if configured != "auto" else detect_language(user_input)


def language_instruction(user_input: str, configured: str) -> str:
    language = answer_language(user_input, configured)
    if language:
        return f"Write every text value in {language}; keep JSON keys and ids in English."
    return "Write every text value in the language of the story request; keep JSON keys and ids in English."


# Story prose in each language this module names, written for this project: a backend tokenizes it to
# learn what a character of the answer costs on its model (SmolLM2 spends 1.8 tokens a Chinese one).
SAMPLES = {
    "English": "At dawn the ferry left without its captain. Mara stood at the rail, holding the brass key he "
               "had pressed into her hand, and wondered which of the locked doors below it would open first.",
    "Simplified Chinese": "黎明时分，渡轮在没有船长的情况下离开了港口。"
                          "玛拉站在栏杆旁，紧紧握着他塞进她手里的那把黄铜钥匙，"
                          "心里想着它最先会打开下面哪一扇上了锁的门。"
                          "雾气从河面升起，远处的钟声一下一下地响着。",
    "Japanese": "夜明けに、フェリーは船長を乗せないまま港を出た。マラは手すりのそばに立ち、彼に渡された真鍮の鍵を"
                "握りしめながら、下の階のどの扉が最初に開くのだろうと考えていた。",
    "Korean": "새벽이 되자 여객선은 선장 없이 항구를 떠났다. 마라는 난간 옆에 서서 그가 손에 쥐여 준 놋쇠 열쇠를 "
              "꼭 쥔 채, 아래층의 잠긴 문 중 어느 것이 먼저 열릴지 생각했다.",
    "Russian": "На рассвете паром ушёл без капитана. Мара стояла у поручня, сжимая латунный ключ, который он "
               "вложил ей в ладонь, и гадала, какую из запертых дверей внизу он откроет первой.",
    "Arabic": "عند الفجر غادرت العبّارة الميناء من دون قبطانها. وقفت مارا عند الحاجز تمسك المفتاح النحاسي الذي "
              "وضعه في يدها، وتتساءل أيّ الأبواب المقفلة في الأسفل سيفتح أولاً.",
    "Hindi": "भोर होते ही नाव अपने कप्तान के बिना बंदरगाह से चल पड़ी। मारा रेलिंग के पास खड़ी थी और उसके दिए "
             "पीतल की चाबी को कसकर पकड़े सोच रही थी कि नीचे कौन सा बंद दरवाज़ा पहले खुलेगा।",
    "Thai": "เมื่อรุ่งสาง เรือข้ามฟากออกจากท่าโดยไม่มีกัปตัน มาราเยืนอยู่ข้างราวเรือ กำกุญแจทองเหลืองที่เขายัดใส่มือเธอไว้แน่น "
            "และสงสัยว่ามันจะเปิดประตูบานไหนข้างล่างเป็นบานแรก",
}


def language_sample(user_input: str, configured: str) -> str:
    """Text in the answer's language; the request itself when no sample of that language is here."""
    language = answer_language(user_input, configured)
    if language is None:
        return user_input if len(user_input) >= 40 else SAMPLES["English"]
    return SAMPLES.get(language, user_input)


# Schema builders: every object lists all its properties as required, in the order they are written.
def text(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "string", "minLength": lo, "maxLength": hi}


def prose(lo: int, hi: int, least: int | None = None) -> dict[str, Any]:
    """Prose a scorer reads: it ends on a full sentence (the local engine cannot close it anywhere else).
    `least`: what it may fall to below `lo` (the contract's own floor) when an answer must be small to
    arrive in time; `lo` is what the scoring rules reward."""
    node = {**text(lo, hi), "pattern": ENDS_ON_SENTENCE}
    return {**node, LEAST: least} if least is not None and least < lo else node


def aside(node: dict[str, Any]) -> dict[str, Any]:
    """A part no scorer reads (docs/protocol.md, "What the scorers read"): under load it gives up its length
    before the prose that is judged does."""
    return {**node, UNSCORED: True}


def texts(lo_items: int, hi_items: int, lo: int, hi: int) -> dict[str, Any]:
    return {"type": "array", "items": text(lo, hi), "minItems": lo_items, "maxItems": hi_items}


def obj(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def const(value: Any) -> dict[str, Any]:
    return {"const": value}


def exact_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "array", "prefixItems": items, "items": False,
            "minItems": len(items), "maxItems": len(items)}


# Reading a schema that a backend may have shrunk to fit its time.
def at(schema: dict[str, Any], *path: str | int) -> dict[str, Any]:
    """The sub-schema at a path of property names and item positions."""
    for step in path:
        schema = schema["prefixItems"][step] if isinstance(step, int) else schema["properties"][step]
    return schema


def about(schema: dict[str, Any]) -> str:
    """The length to ask a model for: the middle of the bounds, so it ends before the ceiling cuts it."""
    middle = (schema.get("minLength", 0) + schema["maxLength"]) / 2
    return f"about {round(middle, -1 if middle >= 100 else 0):,.0f} characters"


def prefix_before(answer: dict[str, Any], path: list[str | int]) -> str:
    """The answer's compact JSON up to the value at path: what a retry keeps and continues from."""
    cut = "\u0000cut\u0000"
    marked = copy.deepcopy(answer)
    node: Any = marked
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = cut
    text = json.dumps(marked, ensure_ascii=False, separators=(",", ":"))
    return text[:text.index(json.dumps(cut))]


# Contract checks: each appends a readable problem and returns whether the value passed.
def check_str(problems: list[str], obj: dict, key: str, lo: int = 1, hi: int | None = None, where: str = "") -> bool:
    value = obj.get(key)
    name = f"{where}{key}"
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name} must be a non-empty string")
        return False
    if len(value) < lo or (hi is not None and len(value) > hi):
        problems.append(f"{name} has {len(value)} characters, needs {lo}-{hi or 'any'}")
        return False
    return True


def check_str_list(problems: list[str], obj: dict, key: str, lo: int = 1, hi: int | None = None, where: str = "") -> bool:
    value = obj.get(key)
    name = f"{where}{key}"
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"{name} must be a list of non-empty strings")
        return False
    if len(value) < lo or (hi is not None and len(value) > hi):
        problems.append(f"{name} has {len(value)} items, needs {lo}-{hi or 'any'}")
        return False
    return True


def check_dict(problems: list[str], obj: dict, key: str, where: str = "") -> bool:
    if not isinstance(obj.get(key), dict):
        problems.append(f"{where}{key} must be an object")
        return False
    return True
