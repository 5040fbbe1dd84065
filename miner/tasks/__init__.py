"""Task specs: for each task_type, the chat messages, the JSON schema, the token budget, and the check.

The schema is what a backend constrains its output to; the check holds the parsed object against the
full contract in docs/protocol.md (things JSON schema cannot say, like distinct consequences).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from miner.tasks import blueprint, chapters, characters, story_arc
from miner.tasks.common import ContractError, TaskInputError, language_instruction, prefix_before
from miner.tasks.context import context_part

__all__ = ["TASKS", "TaskSpec", "Context", "ContractError", "TaskInputError", "parse_json_object"]


@dataclass(frozen=True)
class Context:
    """The validated inputs of one request."""
    user_input: str
    blueprint: dict[str, Any] | None = None
    characters: list[dict[str, Any]] | None = None  # the cast, whichever shape it came in
    story_arc: dict[str, Any] | None = None
    chapter_ids: list[int] | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    needs: tuple[str, ...]  # Context fields the task cannot do without
    module: Any  # the task's module: instructions(ctx, schema), schema(ctx), max_tokens(ctx), check(obj, ctx)

    def messages(self, ctx: Context, language: str = "auto",
                 schema: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """The chat asking for an answer to `schema` (default: the full one), its planned lengths named."""
        system = (
            "You are a novelist and story architect. You answer with exactly one JSON object that follows "
            "the requested fields, with vivid, original, specific writing; every description is written in full "
            "sentences. "
            + language_instruction(ctx.user_input, language))
        parts = [f"Story request: {ctx.user_input}"]
        parts += [context_part(field, getattr(ctx, field)) for field in self.needs if field != "chapter_ids"]
        parts.append(self.module.instructions(ctx, schema or self.schema(ctx)))
        # Said last as well: the English context around it pulls a small model into English.
        parts.append(language_instruction(ctx.user_input, language))
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]

    def schema(self, ctx: Context) -> dict[str, Any]:
        return self.module.schema(ctx)

    def max_tokens(self, ctx: Context) -> int:
        """A safety bound, not a target: the schema's lengths end the answer. Generous, since small
        tokenizers spend 2-3 tokens per Chinese character; the request's deadline is the real limit."""
        return self.module.max_tokens(ctx)

    def check(self, obj: Any, ctx: Context) -> dict[str, Any]:
        """Return the object if it meets the contract, else raise ContractError listing every problem and,
        where the task can tell, the start of the answer a retry may keep."""
        if not isinstance(obj, dict):
            raise ContractError(f"{self.name}: expected a JSON object, got {type(obj).__name__}")
        problems = self.module.check(obj, ctx)
        if problems:
            retry_path = getattr(self.module, "retry_path", None)  # only a lone problem is worth a partial retry
            path = retry_path(obj, ctx) if retry_path and len(problems) == 1 else None
            raise ContractError(f"{self.name}: " + "; ".join(problems),
                                retry_from=prefix_before(obj, path) if path else None)
        return obj


TASKS: dict[str, TaskSpec] = {
    "blueprint": TaskSpec("blueprint", (), blueprint),
    "characters": TaskSpec("characters", ("blueprint",), characters),
    "story_arc": TaskSpec("story_arc", ("blueprint", "characters"), story_arc),
    "chapters": TaskSpec("chapters", ("blueprint", "characters", "story_arc", "chapter_ids"), chapters),
}


def parse_json_object(text: str) -> dict[str, Any]:
    """Parse a model's answer: the JSON object itself, or one wrapped in prose or a code fence. Raw control
    characters inside strings (a newline in a chapter, as some APIs write them) are read, not refused."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ContractError(f"the answer holds no JSON object (starts {text[:60]!r})")
    try:
        obj = json.loads(text[start:end + 1], strict=False)
    except json.JSONDecodeError as e:
        raise ContractError(f"the answer is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ContractError("the answer is not a JSON object")
    return obj
