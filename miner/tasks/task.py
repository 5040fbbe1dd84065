"""The task interface, as backends have theirs: each task type (blueprint, characters, story_arc, chapters)
is a Task that says what it needs, what it asks the model for, the JSON schema answers are held to, and
the contract's rules; asking (messages) and checking (check) work alike for every task, here."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from miner.errors import ContractError
from miner.tasks.common import language_instruction, prefix_before
from miner.tasks.context import context_part

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """The validated inputs of one request."""
    user_input: str
    blueprint: dict[str, Any] | None = None
    characters: list[dict[str, Any]] | None = None  # the cast, whichever shape it came in
    story_arc: dict[str, Any] | None = None
    chapter_ids: list[int] | None = None


class Task(ABC):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]  # Context fields the task cannot do without

    @abstractmethod
    def instructions(self, ctx: Context, schema: dict[str, Any]) -> str:
        """The task's own part of the prompt, naming the lengths `schema` plans."""

    @abstractmethod
    def schema(self, ctx: Context) -> dict[str, Any]:
        """The full-size JSON schema an answer is held to."""

    @abstractmethod
    def max_tokens(self, ctx: Context) -> int:
        """A safety bound, not a target: the schema's lengths end the answer. Generous, since small
        tokenizers spend 2-3 tokens per Chinese character; the request's deadline is the real limit."""

    @abstractmethod
    def problems(self, answer: dict[str, Any], ctx: Context) -> list[str]:
        """Every rule of the contract the answer breaks (things a schema cannot say, like distinct
        consequences); empty when it meets them all."""

    def to_contract(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The contract's shape of what the model wrote to the schema (chapters: paragraphs into content);
        the answer itself where they are the same."""
        return answer

    def retry_path(self, answer: dict[str, Any], ctx: Context) -> list[str | int] | None:
        """Where, for a lone problem, the answer went wrong: a retry keeps what comes before. None: retry whole."""
        return None

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
        parts.append(self.instructions(ctx, schema or self.schema(ctx)))
        # Said last as well: the English context around it pulls a small model into English.
        parts.append(language_instruction(ctx.user_input, language))
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]

    def check(self, obj: Any, ctx: Context) -> dict[str, Any]:
        """Return the answer in the contract's shape, its keys only, if it meets the contract; else raise
        ContractError listing every problem and, where the task can tell, the start of the answer a retry may
        keep.
        Keys an API adds are dropped: a 3.2.1 validator sets each key that names a synapse field on a
        synapse of its own, and a value that field refuses costs every miner of its step (contract.py)."""
        if not isinstance(obj, dict):
            raise ContractError(f"{self.name}: expected a JSON object, got {type(obj).__name__}")
        answer = self.to_contract(obj)
        problems = self.problems(answer, ctx)
        if problems:
            path = self.retry_path(answer, ctx) if len(problems) == 1 else None  # a lone problem is worth it
            # the retry continues the model's own text, in the schema's shape
            raise ContractError(f"{self.name}: " + "; ".join(problems),
                                retry_from=prefix_before(obj, path) if path else None)
        keys = self.schema(ctx)["properties"]
        extra = [key for key in answer if key not in keys]
        if extra:
            log.debug("%s: dropped keys outside the contract: %s", self.name, ", ".join(map(repr, extra[:10])))
        return {key: answer[key] for key in keys}
