"""Schema -> GBNF: every task's grammar is accepted by llama.cpp, and output under it obeys the schema."""
import json
import time

import llama_cpp
import pytest

from backends.base import Request
from backends.grammar import SchemaNotSupported, schema_to_gbnf
from miner import examples
from miner.tasks import TASKS, Context
from miner.tasks.common import obj, text, texts

CTX = Context(**{k: v for k, v in examples.example_fields("chapters").items() if k != "task_type"})


def accepted_by_llama_cpp(backend, grammar: str) -> bool:
    vocab = llama_cpp.llama_model_get_vocab(backend.llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_grammar_parses_in_llama_cpp(embedded_backend, task):
    assert accepted_by_llama_cpp(embedded_backend, schema_to_gbnf(TASKS[task].schema(CTX)))


def test_a_broken_grammar_is_refused(embedded_backend):
    assert not accepted_by_llama_cpp(embedded_backend, "root ::= undefined-rule\n")


def test_long_strings_use_a_few_rules_not_thousands():
    grammar = schema_to_gbnf(obj(body=text(1000, 3000)))
    assert "chunk" in grammar and len(grammar.splitlines()) < 12


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": text(1, 5)}, "required": []}, "must be required"),
    ({"type": "array", "items": text(1, 5)}, "maxItems"),
    ({"type": "null"}, "not supported"),
])
def test_unsupported_schemas_are_refused_clearly(schema, message):
    with pytest.raises(SchemaNotSupported, match=message):
        schema_to_gbnf(schema)


def test_generated_json_obeys_the_schema(embedded_backend):
    schema = obj(name=text(3, 12), tags=texts(2, 3, 2, 10), note=text(300, 420),
                 kind={"enum": ["cat", "dog"]}, n={"const": 7})
    request = Request(messages=[{"role": "user", "content": "Describe a pet as JSON."}], max_tokens=400,
                      deadline=time.monotonic() + 120, schema=schema)
    answer = json.loads(embedded_backend.generate(request).text)
    assert list(answer) == ["name", "tags", "note", "kind", "n"]
    assert 3 <= len(answer["name"]) <= 12 and 2 <= len(answer["tags"]) <= 3
    assert all(2 <= len(t) <= 10 for t in answer["tags"])
    assert 300 <= len(answer["note"]) <= 420
    assert answer["kind"] in ("cat", "dog") and answer["n"] == 7
