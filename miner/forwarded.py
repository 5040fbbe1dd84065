"""A replica of what a 3.2.1 validator does with an answer once its Dendrite has deserialized it
(StorynetAI/storynet-subnet neurons/validator.py at 299afc4; docs/protocol.md, "What a 3.2.1 validator
forwards"): it makes a fresh StoryGenerationSynapse of its own declaration, sets on it every key of
output_data that the synapse has as an attribute (bittensor synapses validate each assignment: one value a
field refuses raises inside the validator's loop, and every miner of that step gets an empty answer), takes
the whole dict as output_data when no key set it, and sends the scoring service {output_data,
generation_time, task_type, model_info} read off that synapse. demo, loadtest and the tests read answers
through it; the miner itself never needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import bittensor as bt
from pydantic import Field, ValidationError, field_validator

from miner.contract import TASK_TYPES


class StoryGenerationSynapse(bt.Synapse):
    """The synapse as 3.2.1 declares it (template/protocol.py): strict types, and validators on task_type and
    protocol_version. The class name is the route, so a Dendrite can query a miner with it, as validators do."""
    protocol_version: str = Field("3.2.1")
    task_type: str = Field("")
    user_input: str = Field("")
    blueprint: Optional[Dict[str, Any]] = Field(None)
    characters: Optional[List[Dict[str, Any]]] = Field(None)
    story_arc: Optional[Dict[str, Any]] = Field(None)
    chapter_ids: Optional[List[int]] = Field(None)
    output_data: Optional[Dict[str, Any]] = Field(None)
    generation_time: float = Field(0.0)
    miner_version: str = Field("")
    model_info: Optional[Dict[str, Any]] = Field(None)
    miner_hotkey: Optional[str] = Field(None)
    validator_hotkey: Optional[str] = Field(None)

    @field_validator("task_type")
    @classmethod
    def _task_type(cls, v: str) -> str:
        if v != "" and v not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {list(TASK_TYPES)}, got {v}")
        return v

    @field_validator("protocol_version")
    @classmethod
    def _protocol_version(cls, v: str) -> str:
        if v != "" and len(v.split(".")) != 3:
            raise ValueError(f"protocol_version must be in format X.Y.Z, got {v}")
        return v

    def deserialize(self) -> Optional[Dict[str, Any]]:
        return self.output_data


class RebuildRefused(Exception):
    """The validator's rebuild raises on this answer: its whole step is lost, for every miner."""


def rebuild(output: dict[str, Any]) -> StoryGenerationSynapse:
    """The synapse a 3.2.1 validator rebuilds from a deserialized answer (a dict), or RebuildRefused."""
    synapse = StoryGenerationSynapse()
    for key, value in output.items():
        if hasattr(synapse, key):
            try:
                setattr(synapse, key, value)
            except (ValidationError, ValueError, TypeError, AttributeError) as e:
                first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                raise RebuildRefused(f"output_data[{key!r}] = {value!r:.60} is refused by the synapse's {key}: "
                                     f"{first}") from None
    if synapse.output_data is None:
        synapse.output_data = output
    return synapse


def scoring_entry(synapse: StoryGenerationSynapse) -> dict[str, Any]:
    """One miner's entry in the payload the validator POSTs to the scoring service."""
    output = synapse.output_data
    model_info = synapse.model_info
    if model_info is None and isinstance(output, dict):
        model_info = output.get("_model_info")
    return {"output_data": output, "generation_time": synapse.generation_time, "task_type": synapse.task_type,
            "model_info": model_info}


@dataclass
class Forwarded:
    """An answer as the scoring service receives it: `entry` (None when the rebuild raised) and what is
    wrong with it; an empty `problems` is an answer forwarded intact, scored for the step's task."""
    entry: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    @property
    def breaks_step(self) -> bool:
        return self.entry is None

    @property
    def task_type(self) -> str | None:
        return None if self.entry is None else self.entry["task_type"]


def forward(output: Any, step_task: str) -> Forwarded:
    """What the scoring service gets of `output` (the deserialized answer: output_data, or None when the
    query failed) in a step of task `step_task`, and every way it differs from the answer the miner gave."""
    if not isinstance(output, dict):  # a failed query: the validator forwards an error of its own
        return Forwarded({"output_data": {"error": "Invalid response type received"}, "generation_time": 0.0,
                          "task_type": "", "model_info": None}, ["no answer came back"])
    try:
        entry = scoring_entry(rebuild(output))
    except RebuildRefused as e:
        return Forwarded(None, [f"the validator's rebuild raises, and every miner of its step gets an empty "
                                f"answer: {e}"])
    problems = []
    if entry["task_type"] != step_task:
        problems.append(f"forwarded with task_type {entry['task_type']!r}, not the step's {step_task!r}")
    seconds = entry["generation_time"]
    if "generation_time" not in output or not isinstance(seconds, float) or not math.isfinite(seconds) or seconds < 0:
        problems.append(f"forwarded with generation_time {seconds!r} (output_data says "
                        f"{output.get('generation_time')!r})")
    if not isinstance(entry["model_info"], dict):
        problems.append(f"forwarded with model_info {entry['model_info']!r:.60}, not an object")
    if entry["output_data"] != output:
        problems.append("output_data is not forwarded as the miner sent it")
    return Forwarded(entry, problems)
