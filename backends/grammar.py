"""JSON schema -> GBNF for llama.cpp, for the subset of JSON schema the task specs use.

Why not llama-cpp-python's converter: it spells a string's maxLength as nested optional rules, so a
1000-3000 character string overflows llama.cpp's grammar parser (docs/measurements.md). Here long strings are
chunks of fixed length repeated, and objects are compact JSON with properties in schema order, which
also spends no tokens on whitespace.
"""
from __future__ import annotations

import json
from typing import Any

CHUNK = 50  # characters per repeated chunk in long strings
SPAN = 200  # up to this many optional characters are spelled out directly (one nested rule each)

BASE_RULES = {
    "char": r'[^"\\\x00-\x1f] | "\\" ["\\/bfnrt]',
    "integer": r'"-"? ([0-9] | [1-9] [0-9]{0,15})',
    "number": r'"-"? ([0-9] | [1-9] [0-9]{0,15}) ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,4})?',
    "boolean": r'"true" | "false"',
    "string": r'"\"" char{0,500} "\""',
}


class SchemaNotSupported(ValueError):
    pass


def _gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # GBNF string literals escape like JSON strings


def _literal(value: Any) -> str:
    """A GBNF literal matching exactly the compact JSON encoding of value."""
    return _gbnf_literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _Builder:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def add(self, body: str, hint: str) -> str:
        for name, existing in self.rules.items():
            if existing == body:
                return name
        name = f"{hint}{len(self.rules)}"
        self.rules[name] = body
        return name

    def visit(self, schema: Any, hint: str = "r") -> str:
        """Return a GBNF expression matching schema."""
        if schema is True or schema == {}:
            raise SchemaNotSupported("free-form values are not supported; give every value a type")
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(_literal(v) for v in schema["enum"]) + ")"
        kind = schema.get("type")
        visit = {"object": self._object, "array": self._array, "string": self._string}.get(kind)
        if visit:
            return visit(schema, hint)
        if kind in ("integer", "number", "boolean"):
            return kind
        raise SchemaNotSupported(f"schema type {kind!r} is not supported: {json.dumps(schema)[:80]}")

    def _object(self, schema: dict, hint: str) -> str:
        props = schema.get("properties", {})
        if set(schema.get("required", [])) != set(props):
            raise SchemaNotSupported("every object property must be required")
        if not props:
            return '"{}"'
        parts = []
        for i, (key, sub) in enumerate(props.items()):
            sep = "," if i else ""
            parts.append(f"{_gbnf_literal(sep + json.dumps(key, ensure_ascii=False) + ':')} {self.visit(sub, key[:8])}")
        return self.add('"{" ' + " ".join(parts) + ' "}"', hint)

    def _array(self, schema: dict, hint: str) -> str:
        prefix = schema.get("prefixItems", [])
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if prefix:
            if schema.get("items", False) is not False or hi is None or hi > len(prefix):
                raise SchemaNotSupported("prefixItems arrays must set items: false and maxItems <= len(prefixItems)")
            items = [self.visit(s, hint) for s in prefix[:hi]]
            body = items[0] if lo else f"({items[0]}"
            tail = ""
            for i, item in enumerate(items[1:], start=1):
                if i < lo:
                    body += f' "," {item}'
                else:
                    body += f' ("," {item}'
                    tail += ")?"
            body += tail + ("" if lo else ")?")
            return self.add(f'"[" {body} "]"', hint)
        if hi is None:
            raise SchemaNotSupported("arrays must set maxItems")
        item = self.visit(schema["items"], hint)
        if hi == 0:
            return '"[]"'
        rest = f'("," {item}){{{max(lo - 1, 0)},{hi - 1}}}'
        body = f"{item} {rest}" if lo else f"({item} {rest})?"
        return self.add(f'"[" {body} "]"', hint)

    def _string(self, schema: dict, hint: str) -> str:
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if hi is None:
            return "string"
        if hi - lo <= SPAN:
            return self.add(f'"\\"" char{{{lo},{hi}}} "\\""', "str")
        # Lengths from CHUNK*a to CHUNK*b + CHUNK-1: inside [lo, hi], and a few rules however long.
        a, b = -(-lo // CHUNK), (hi - CHUNK + 1) // CHUNK
        chunk = self.add(f"char{{{CHUNK}}}", "chunk")
        return self.add(f'"\\"" {chunk}{{{a},{b}}} char{{0,{CHUNK - 1}}} "\\""', "long")


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    builder = _Builder()
    root = builder.visit(schema, "root")
    lines = [f"root ::= {root}"]
    lines += [f"{name} ::= {body}" for name, body in builder.rules.items()]
    lines += [f"{name} ::= {body}" for name, body in BASE_RULES.items()]
    return "\n".join(lines) + "\n"
