"""One request, start to finish, with no Axon in sight: check the inputs, ask the backend chain,
check the answer against the contract, and build output_data (the answer, or a clear error)."""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from backends.base import BackendError, Dry, Generation, Request
from backends.chain import Chain
from miner.config import GenerationSettings
from miner.contract import VALIDATOR_TIMEOUT_S, error_answer, with_miner_fields
from miner.errors import AllBackendsFailed
from miner.tasks import TASKS, Context, Task, TaskInputError, parse_json_object
from miner.tasks.common import language_sample

log = logging.getLogger(__name__)

MAX_CHAPTER_ID = 100
# A longer timeout is read as this: validators wait 60 s, and an answer planned for longer would hold a
# decoding slot for minutes, most likely for a caller that has long stopped waiting.
MAX_TIMEOUT_S = 600.0


@dataclass
class Answer:
    output: dict[str, Any]
    seconds: float
    model_info: dict[str, Any] | None = None  # None: nothing was generated
    generation: Generation | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return "error" not in self.output


# Control characters (tab and newlines aside) and lone surrogates say nothing to a model, and a lone
# surrogate cannot even be encoded to UTF-8 for the tokenizer or the answer; they are cleaned, not refused.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # a valid pair is one code point once decoded
MAX_CONTEXT_DEPTH = 12  # validators' contexts nest 4 deep; deeper is hostile, and deep enough breaks json.dumps


def clean_text(value: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", _CONTROL.sub("", value))


def _check_text(name: str, value: Any, limit: int, required: bool) -> str:
    if not isinstance(value, str):
        raise TaskInputError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise TaskInputError(f"{name} has {len(value)} characters; the limit is {limit} "
                             f"(generation.max_input_chars)")
    value = clean_text(value)
    if required and not value.strip():
        raise TaskInputError(f"{name} is empty")
    return value


def _clean_json(name: str, value: Any, limit: int) -> Any:
    """A cleaned copy of a JSON value, refused when it holds anything but JSON, nests deeper than
    MAX_CONTEXT_DEPTH, or outgrows `limit` characters. Iterative: hostile depth must not hit the recursion limit."""
    size = 0
    root: list[Any] = [None]
    stack: list[tuple[Any, list[Any] | dict[str, Any], Any, int]] = [(value, root, 0, 0)]
    while stack:
        item, parent, key, depth = stack.pop()
        if depth > MAX_CONTEXT_DEPTH:
            raise TaskInputError(f"{name} nests more than {MAX_CONTEXT_DEPTH} levels deep; send the context "
                                 f"as the earlier answer gave it")
        if isinstance(item, str):
            size += len(item) + 2
            item = clean_text(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise TaskInputError(f"{name} holds {item}, which is not a JSON number")
        elif isinstance(item, dict):
            copy: dict[str, Any] = {}
            for k, v in item.items():
                if not isinstance(k, str):
                    raise TaskInputError(f"{name} has a key of type {type(k).__name__}; JSON keys are strings")
                size += len(k) + 4
                k = clean_text(k)
                copy[k] = None  # keeps the keys' order; the value is filled in when its turn comes
                stack.append((v, copy, k, depth + 1))
            item = copy
        elif isinstance(item, list):
            copy_list: list[Any] = [None] * len(item)
            size += len(item) + 2
            stack.extend((v, copy_list, i, depth + 1) for i, v in enumerate(item))
            item = copy_list
        elif item is not None and not isinstance(item, (bool, int, float)):
            raise TaskInputError(f"{name} holds a {type(item).__name__}, which is not a JSON value")
        else:
            size += 5
        if size > limit:
            raise TaskInputError(f"{name} is more than {limit} characters of JSON; the limit is {limit} "
                                 f"(generation.max_context_chars)")
        parent[key] = item
    return root[0]


def _clean_sized(name: str, value: Any, limit: int) -> Any:
    value = _clean_json(name, value, limit)
    size = len(json.dumps(value, ensure_ascii=False))
    if size > limit:
        raise TaskInputError(f"{name} is {size} characters of JSON; the limit is {limit} "
                             f"(generation.max_context_chars)")
    return value


def _check_context(name: str, value: Any, limit: int) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TaskInputError(f"{name} must be a JSON object, got {type(value).__name__}")
    return _clean_sized(name, value, limit)


def _check_cast(value: Any, limit: int) -> list[dict[str, Any]] | None:
    """The cast as a list of character objects: 3.2.1 sends the list itself, 3.2.0 wraps it as
    {"characters": [...]}. An empty cast is valid: 3.2.1 sends one with every chapters request."""
    if value is None:
        return None
    cast = value.get("characters") if isinstance(value, dict) else value
    if not isinstance(cast, list) or not all(isinstance(c, dict) for c in cast):
        raise TaskInputError("characters must be a list of character objects (protocol 3.2.1) or "
                             f'{{"characters": [...]}} (3.2.0), got {type(value).__name__}')
    return _clean_sized("characters", cast, limit)


def _check_chapter_ids(value: Any, limit: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise TaskInputError("chapter_ids must be a non-empty list of chapter numbers")
    if len(value) > limit:
        raise TaskInputError(f"{len(value)} chapter_ids asked for; this miner writes at most {limit} per "
                             f"request (generation.max_chapters)")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_CHAPTER_ID for i in value):
        raise TaskInputError(f"chapter_ids must be whole numbers from 1 to {MAX_CHAPTER_ID}, got {value[:20]}")
    if len(set(value)) != len(value):
        raise TaskInputError("chapter_ids must not repeat")
    return value


def check_timeout(value: Any) -> float:
    """The caller's timeout in seconds, clamped to MAX_TIMEOUT_S; None is a validator's 60 s. NaN, infinity
    and anything not above 0 are refused: they would make a deadline that never comes or has passed."""
    if value is None:
        return VALIDATOR_TIMEOUT_S
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or value <= 0):  # an int is finite
        raise TaskInputError(f"timeout must be a finite number of seconds above 0 (validators send "
                             f"{VALIDATOR_TIMEOUT_S:.0f}; more than {MAX_TIMEOUT_S:.0f} is read as "
                             f"{MAX_TIMEOUT_S:.0f}), got {value!r:.40}")
    return float(min(value, MAX_TIMEOUT_S))  # min first: an int may be too large for a float


def prepare(fields: dict[str, Any], s: GenerationSettings) -> tuple[Task, Context]:
    """Validate a request's fields into a task spec and its context; raise TaskInputError if unusable."""
    task_type = fields.get("task_type")
    if not isinstance(task_type, str) or task_type not in TASKS:
        raise TaskInputError(f"task_type must be one of {', '.join(TASKS)}, got {task_type!r:.80}")
    spec = TASKS[task_type]
    ctx = Context(
        user_input=_check_text("user_input", fields.get("user_input", ""), s.max_input_chars, required=True),
        blueprint=_check_context("blueprint", fields.get("blueprint"), s.max_context_chars),
        characters=_check_cast(fields.get("characters"), s.max_context_chars),
        story_arc=_check_context("story_arc", fields.get("story_arc"), s.max_context_chars),
        chapter_ids=_check_chapter_ids(fields.get("chapter_ids"), s.max_chapters),
    )
    missing = [name for name in spec.needs if getattr(ctx, name) is None]
    if missing:
        raise TaskInputError(f"task {task_type} needs {', '.join(missing)}; the request has none")
    return spec, ctx


def failed_answer(kind: str, text: str, task_type: Any, started: float) -> Answer:
    """An error answer (contract.ERROR_KINDS) to a request that came in at `started` (time.monotonic())."""
    seconds = time.monotonic() - started
    return Answer(with_miner_fields(error_answer(kind, text), task_type, None, seconds), seconds)


class StoryService:
    def __init__(self, chain: Chain, settings: GenerationSettings):
        self.chain = chain
        self.settings = settings

    def prepare(self, fields: dict[str, Any]) -> tuple[Task, Context]:
        return prepare(fields, self.settings)

    def request_for(self, spec: Task, ctx: Context, deadline: float, target: float,
                    priority: float = 0.0, cancelled: threading.Event | None = None) -> Request:
        language = self.settings.language
        schema = spec.schema(ctx)
        return Request(
            messages=spec.messages(ctx, language, schema), schema=schema, max_tokens=spec.max_tokens(ctx),
            deadline=deadline, target=target, resize=functools.partial(spec.messages, ctx, language),
            language_sample=language_sample(ctx.user_input, language), priority=priority,
            temperature=self.settings.temperature, top_p=self.settings.top_p,
            repeat_penalty=self.settings.repeat_penalty,
            dry=Dry(self.settings.dry_multiplier, self.settings.dry_base, self.settings.dry_allowed_length,
                    self.settings.dry_last_n) if self.settings.dry_multiplier > 0 else None,
            cancelled=cancelled if cancelled is not None else threading.Event())

    def answer(self, fields: dict[str, Any], timeout_s: float | None = None, priority: float = 0.0,
               arrived: float | None = None, cancelled: threading.Event | None = None) -> Answer:
        """Blocking. Never raises for bad input or failed backends: the output then carries `error`.
        timeout_s is the caller's own timeout (validators: 60 s; check_timeout says what is accepted),
        counted from `arrived` (time.monotonic() when the request came in; default now): the answer is
        aborted response_margin_s before it, and sized to arrive within target_s. Setting `cancelled`
        (the caller has gone away) stops the answer where the backend can, and the chain tries no other."""
        start = time.monotonic() if arrived is None else arrived
        try:
            hard = max(check_timeout(timeout_s) - self.settings.response_margin_s, 1.0)
            spec, ctx = self.prepare(fields)
            request = self.request_for(spec, ctx, start + hard, start + min(self.settings.target_s, hard), priority,
                                       cancelled)
            output, generation = self.chain.generate(
                request, lambda g: spec.check(parse_json_object(g.text), ctx))
        except (TaskInputError, BackendError) as e:
            log.warning("request failed: %s", e)
            kind = ("input" if isinstance(e, TaskInputError) else
                    "busy" if isinstance(e, AllBackendsFailed) and e.busy else "failed")
            return failed_answer(kind, str(e), fields.get("task_type"), start)
        except Exception as e:  # a bug must cost one answer, never the miner: say so, log the trace
            log.exception("request failed unexpectedly")
            return failed_answer("internal", f"internal error ({type(e).__name__}); the miner's log has the "
                                             f"details", fields.get("task_type"), start)
        seconds = time.monotonic() - start
        info = generation.model.to_wire()
        return Answer(with_miner_fields(output, spec.name, info, seconds), seconds, info, generation)
