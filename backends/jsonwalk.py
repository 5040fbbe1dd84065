"""Follow compact JSON under a schema, character by character, and say what text must come next.

The grammar (backends/grammar.py) writes objects with every key, in order, with no whitespace, so
between the values the model writes there are stretches it has no choice over: `","name":"`, a const
id, a closing `}]}`. The decoder evaluates such a stretch as one batch (prompt speed) instead of one
sampled token at a time (decode speed). The grammar stays the authority: this only proposes text.
"""
from __future__ import annotations

import json
from typing import Any, Generator

Walk = Generator[str, str, None]  # yields the forced continuation, receives the next character


class WalkError(ValueError):
    """The schema uses something the walker does not follow, or the text left the schema."""


def _expect(literal: str) -> Walk:
    for i, char in enumerate(literal):
        got = yield literal[i:]
        if got != char:
            raise WalkError(f"expected {literal[i:]!r}, got {got!r}")


def _string() -> Walk:
    yield from _expect('"')
    escaped = False
    while True:
        got = yield ""
        if escaped:
            escaped = False
        elif got == "\\":
            escaped = True
        elif got == '"':
            return


def _object(schema: dict) -> Walk:
    for i, (key, sub) in enumerate(schema.get("properties", {}).items()):
        yield from _expect(("," if i else "{") + json.dumps(key, ensure_ascii=False) + ":")
        yield from _value(sub)
    yield from _expect("}" if schema.get("properties") else "{}")


def _array(schema: dict) -> Walk:
    items = schema.get("prefixItems") or []
    lo, hi = schema.get("minItems", 0), schema.get("maxItems", len(items))
    if lo < 1 or hi is None:
        raise WalkError("arrays must have minItems >= 1 and maxItems")
    for n in range(hi):
        if n >= lo:  # the model chooses: one more item, or the end
            got = yield ""
            if got == "]":
                return
            if got != ",":
                raise WalkError(f"expected ',' or ']', got {got!r}")
        else:
            yield from _expect("," if n else "[")
        yield from _value(items[n] if n < len(items) else schema["items"])
    yield from _expect("]")


def _value(schema: Any) -> Walk:
    if not isinstance(schema, dict):
        raise WalkError(f"cannot follow schema {schema!r}")
    if "const" in schema:
        return (yield from _expect(json.dumps(schema["const"], ensure_ascii=False, separators=(",", ":"))))
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return (yield from _string())
    follow = {"object": _object, "array": _array}.get(schema.get("type"))
    if follow:
        return (yield from follow(schema))
    if schema.get("type") == "string":
        return (yield from _string())
    raise WalkError(f"cannot follow schema type {schema.get('type')!r}")


class JsonWalker:
    """`forced` is the text that must come next ('' when the model has a choice); `done` once the
    top-level value is complete."""

    def __init__(self, schema: dict):
        self._walk = _value(schema)
        self.forced = next(self._walk)
        self.done = False

    def feed(self, text: str) -> None:
        for char in text:
            if self.done:
                raise WalkError(f"text after the end of the JSON value: {char!r}")
            try:
                self.forced = self._walk.send(char)
            except StopIteration:
                self.done, self.forced = True, ""

    def take_forced(self) -> str:
        """All the text that must come next, fed to the walker already."""
        taken = ""
        while self.forced:
            forced = self.forced
            taken += forced
            self.feed(forced)
        return taken
