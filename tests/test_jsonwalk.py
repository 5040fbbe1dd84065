"""The JSON walker: which text the schema forces, at every point of a real answer."""
import json

import pytest

from backends.jsonwalk import JsonWalker, WalkError
from miner.tasks.common import const, exact_items, obj, text, texts

SCHEMA = obj(id=const(3), name=text(1, 20), tags=texts(1, 3, 1, 10),
             cast=exact_items([obj(role=const("hero"), line=text(1, 40))]))


def test_forced_text_between_the_values_the_model_writes():
    walker = JsonWalker(SCHEMA)
    assert walker.take_forced() == '{"id":3,"name":"'
    walker.feed('Mo \\"the\\" best')  # escaped quotes stay inside the string
    assert walker.forced == ""
    walker.feed('"')
    assert walker.take_forced() == ',"tags":["'
    walker.feed('a"')
    assert walker.forced == ""  # another tag, or the end of the list: the model's choice
    walker.feed(',"b"]')
    assert walker.take_forced() == ',"cast":[{"role":"hero","line":"'
    walker.feed('Hi."')
    assert not walker.done
    assert walker.take_forced() == "}]}"
    assert walker.done


def test_a_full_list_closes_without_asking():
    walker = JsonWalker(obj(tags=texts(1, 2, 1, 5)))
    walker.take_forced()
    walker.feed('a","b"')
    assert walker.take_forced() == "]}" and walker.done


def test_the_walk_of_a_whole_answer_matches_its_compact_json():
    answer = {"id": 3, "name": "Nova", "tags": ["x", "y", "z"], "cast": [{"role": "hero", "line": 'Go, "now"'}]}
    walker = JsonWalker(SCHEMA)
    walker.feed(json.dumps(answer, separators=(",", ":")))
    assert walker.done


@pytest.mark.parametrize("schema", [{"type": "integer"}, obj(a={"type": "array", "items": text(1, 2), "maxItems": 2}),
                                    {"enum": [1, 2]}])
def test_schemas_it_cannot_follow_are_refused_up_front_or_on_the_way(schema):
    with pytest.raises(WalkError):
        walker = JsonWalker(schema)
        walker.take_forced()
        walker.feed("1")


def test_text_that_leaves_the_schema_is_an_error():
    walker = JsonWalker(SCHEMA)
    with pytest.raises(WalkError, match="expected"):
        walker.feed('{"id":4')
    walker = JsonWalker(obj(a=text(1, 3)))
    walker.feed('{"a":"x"}')
    with pytest.raises(WalkError, match="after the end"):
        walker.feed(" ")
