"""llguidance on the embedded model's real vocabulary: every task schema compiles, strings stop exactly at
their maxLength, forced text comes as tokens, and the mask leaves only what the schema allows."""
import json
import re

import numpy as np
import pytest

from backends import llama_lowlevel as ll
from backends.base import BackendError
from backends.constraint import SENTENCE_ENDS, SPACES, Vocabulary
from backends.sizing import skeleton
from miner import examples
from miner.config import GenerationSettings
from miner.service import prepare
from miner.tasks import TASKS
from miner.tasks.common import obj, prose, text, texts
from models.embedded import embedded_model_path

CTX = prepare(examples.example_fields("chapters"), GenerationSettings())[1]


@pytest.fixture(scope="module")
def model():
    m = ll.Model(embedded_model_path(), 0, vocab_only=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def vocab(model):
    return Vocabulary(model)


def feed(model, matcher, text_: str) -> None:
    for token in model.tokenize(text_, add_special=False, parse_special=False):
        matcher.consume([token])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_schema_compiles_and_forces_its_opening(model, vocab, task):
    schema = TASKS[task].schema(CTX)
    forced = model.detokenize(vocab.matcher(schema).forced()).decode()
    first_key = next(iter(schema["properties"]))
    empty = json.dumps(skeleton(schema), separators=(",", ":"))
    assert empty.startswith(forced) and len(forced) >= len(first_key)  # at least the first key, as a batch


def test_a_string_stops_exactly_at_its_max_length(model, vocab):
    matcher = vocab.matcher(obj(story=text(3, 10)))
    feed(model, matcher, '{"story":"' + "灯塔" * 5)  # 10 characters: nothing more may go in the string
    assert model.detokenize(matcher.forced()).decode() == '"}'
    assert matcher.done


def test_a_string_below_its_floor_cannot_end(model, vocab):
    matcher = vocab.matcher(obj(story=text(3, 10)))
    feed(model, matcher, '{"story":"ab')
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    matcher.restrict(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert 0 < len(allowed) < model.n_vocab
    texts = [model.piece(int(t)) for t in allowed]
    assert not any(t.startswith(b'"') for t in texts)  # the closing quote waits for the third character
    assert any(t == b"c" for t in texts)


def test_prose_closes_only_after_a_sentence_ends(model, vocab):
    """The closing quote waits for the end of a sentence, in either script; by its maxLength the string
    must have one."""
    matcher = vocab.matcher(obj(story=prose(20, 60)))
    feed(model, matcher, '{"story":"The tide came in and the boats')
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    matcher.restrict(logits)
    assert not any(model.piece(int(t)).startswith(b'"') for t in np.flatnonzero(np.isfinite(logits)))
    feed(model, matcher, ' stayed out.')
    closing = model.tokenize('"}', add_special=False, parse_special=False)
    assert matcher.ll.validate_tokens(closing) == len(closing)
    chinese = vocab.matcher(obj(story=prose(5, 11)))
    feed(model, chinese, '{"story":"潮水涨了，船没有回来')  # 10 characters and no end yet: the 11th must end it
    logits[:] = 0
    chinese.restrict(logits)
    pieces = [model.piece(int(t)) for t in np.flatnonzero(np.isfinite(logits))]
    ends = [e.encode() for e in SENTENCE_ENDS] + [b"\\"]  # or an escaped quote
    assert "。".encode() in pieces  # and the rest are ends too, whole or their first bytes
    assert all(any(p.startswith(e) or e.startswith(p) for e in ends) for p in pieces)


def test_the_one_token_check_agrees_with_the_full_mask(model, vocab):
    """The lazy check asks the matcher about the drawn token alone; it must say what the mask says."""
    schema = obj(story=text(1, 10))
    a, b = vocab.matcher(schema), vocab.matcher(schema)
    feed(model, a, '{"story":"x')
    quote = model.tokenize('"', add_special=False, parse_special=False)[0]
    assert a.allows(quote) and not b.allows(quote)  # a may end its one-character string; b has not opened
    for matcher in (a, b):
        logits = np.zeros(model.n_vocab, dtype=np.float32)
        matcher.restrict(logits)
        masked = np.isfinite(logits)
        sample = np.random.default_rng(0).choice(model.n_vocab, 300, replace=False)
        assert [matcher.allows(int(t)) for t in sample] == [bool(masked[t]) for t in sample]
        assert masked[quote] == matcher.allows(quote)
    assert not a.allows(model.special_token("eos"))  # mid-answer, the end of text is refused too


def test_a_finished_answer_parses_and_is_done(model, vocab):
    schema = TASKS["blueprint"].schema(CTX)
    matcher = vocab.matcher(schema)
    answer = {k: v for k, v in examples.BLUEPRINT.items()}
    answer["themes"] = answer["themes"][:4]
    # the schema asks for more than the contract: prose past the scoring rules' thresholds
    answer["setting"] += " Supplies run low, the crews whisper about ghosts, and nobody sleeps well anymore."
    answer["core_conflict"] += " Either way, someone she trusts will be lost."
    feed(model, matcher, json.dumps(answer, ensure_ascii=False, separators=(",", ":")))
    assert matcher.done


def test_text_outside_the_schema_is_refused_with_the_reason(model, vocab):
    matcher = vocab.matcher(obj(story=text(1, 10)))
    with pytest.raises(BackendError, match="refused a token"):
        feed(model, matcher, '{"tale":"')


def test_a_schema_llguidance_cannot_compile_is_a_clear_error(vocab):
    with pytest.raises(BackendError, match="cannot constrain output to the schema"):
        vocab.matcher({"type": "string", "pattern": "(unclosed"})


def test_a_short_string_cannot_be_only_spaces(model, vocab):
    matcher = vocab.matcher(obj(skills=texts(2, 3, 2, 20)))
    feed(model, matcher, '{"skills":["')
    with pytest.raises(BackendError, match="refused a token"):
        feed(model, matcher, "  ")


def test_no_space_the_contract_strips_may_start_a_short_string(model, vocab):
    every = "".join(map(chr, range(0x110000)))
    assert re.findall(f"[{SPACES}]", every) == [c for c in every if c.isspace()]  # what str.strip() removes
    for space in ("\u3000", "\xa0", "\\u001f", "\\u001c"):  # the last two are JSON escapes: \S let them by
        matcher = vocab.matcher(obj(skills=texts(2, 3, 2, 20)))
        feed(model, matcher, '{"skills":["')
        with pytest.raises(BackendError, match="refused a token"):
            feed(model, matcher, space * 2)


@pytest.mark.parametrize("node", [prose(20, 400), text(5, 90), text(60, 400)], ids=["prose", "short", "long"])
def test_no_control_character_gets_into_a_string(model, vocab, node):
    """A small model left free wrote a chapter of \\u0002-style escapes, six tokens a character: every string
    refuses control characters (the newline aside), raw or escaped, and still takes any other text."""
    for control in ("\\u0002", "\\u001b", "\\u007f", "\\t", "\\b", "\x7f", "\x85"):
        matcher = vocab.matcher(obj(story=node))
        feed(model, matcher, '{"story":"The tide came in')
        with pytest.raises(BackendError, match="refused a token"):
            feed(model, matcher, control)
    matcher = vocab.matcher(obj(story=node))
    feed(model, matcher, '{"story":"The tide came in,\\n潮水涨了。 «Ça va», she said — 100% sure! The boats stayed out."}')
    assert matcher.done
