"""The StoryFi synapse, wire-compatible with protocol 3.2.0 as the subnet's validators send it.

The class name is the HTTP route: validators reach `StoryGenerationSynapse` and nothing else.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import logging

import bittensor as bt
from pydantic import Field, field_validator

# Importing bittensor sets every logger that already exists to CRITICAL; ours go back to inheriting
# the level the CLI chose. Every module that uses bittensor imports this one.
for _name, _logger in list(logging.root.manager.loggerDict.items()):
    if isinstance(_logger, logging.Logger) and _name.split(".")[0] in ("miner", "backends", "models"):
        _logger.setLevel(logging.NOTSET)

PROTOCOL_VERSION = "3.2.0"
TASK_TYPES = ("blueprint", "characters", "story_arc", "chapters")


def unknown_model_info() -> Dict[str, Any]:
    return {"mode": "unknown", "name": "unknown", "version": None, "provider": None, "parameters": {}}


class StoryGenerationSynapse(bt.Synapse):
    # Filled by the validator.
    protocol_version: str = Field(PROTOCOL_VERSION, description="X.Y.Z, or empty")
    task_type: str = Field("", description="blueprint | characters | story_arc | chapters (empty allowed)")
    user_input: str = Field("", description="The story request, any language")
    blueprint: Optional[Dict[str, Any]] = Field(None, description="Context for characters, story_arc, chapters")
    characters: Optional[Dict[str, Any]] = Field(None, description="Context for story_arc, chapters")
    story_arc: Optional[Dict[str, Any]] = Field(None, description="Context for chapters")
    chapter_ids: Optional[List[int]] = Field(None, description="Chapters to write")

    # Filled by the miner.
    output_data: Optional[Dict[str, Any]] = Field(None, description="The answer, or {'error': ...}")
    generation_time: float = Field(0.0, description="Seconds spent generating")
    miner_version: str = Field("", description="Miner software version")
    model_info: Dict[str, Any] = Field(default_factory=unknown_model_info, description="What generated the answer")

    # Unused: identity comes only from synapse.dendrite.hotkey.
    miner_hotkey: Optional[str] = Field(None)
    validator_hotkey: Optional[str] = Field(None)

    @field_validator("task_type")
    @classmethod
    def _task_type(cls, v: str) -> str:
        if v and v not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)} (or empty), got {v!r}")
        return v

    @field_validator("protocol_version")
    @classmethod
    def _protocol_version(cls, v: str) -> str:
        if v and len(v.split(".")) != 3:
            raise ValueError(f"protocol_version must look like X.Y.Z, got {v!r}")
        return v

    def deserialize(self) -> Optional[Dict[str, Any]]:
        return self.output_data
