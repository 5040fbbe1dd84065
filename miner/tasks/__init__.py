"""The tasks by task_type: for each, the chat messages, the JSON schema, the token budget, and the check
(miner/tasks/task.py declares what a task is).

The schema is what a backend constrains its output to; the check holds the parsed object against the
full contract in docs/protocol.md (things JSON schema cannot say, like distinct consequences).
"""
from __future__ import annotations

import json
from typing import Any

from miner.contract import TASK_TYPES
from miner.errors import ContractError, TaskInputError
from miner.tasks.blueprint import Blueprint
from miner.tasks.chapters import Chapters
from miner.tasks.characters import Characters
from miner.tasks.story_arc import StoryArc
from miner.tasks.task import Context, Task

__all__ = ["TASKS", "Task", "Context", "ContractError", "TaskInputError", "parse_json_object"]

TASKS: dict[str, Task] = {task.name: task for task in (Blueprint(), Characters(), StoryArc(), Chapters())}
assert tuple(TASKS) == TASK_TYPES, "the synapse's task_type takes exactly these (miner/contract.py)"


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
