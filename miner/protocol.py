"""The StoryNet synapse, wire-compatible with protocol 3.2.1 (StorynetAI/storynet-subnet) and with 3.2.0
(StoryFi, vya42/storyfi-subnet), as the subnet's validators send them.

The class name is the HTTP route: validators reach `StoryGenerationSynapse` and nothing else.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import logging

import bittensor as bt
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from miner import PROTOCOL_VERSION

# Importing bittensor sets every logger that already exists to CRITICAL; ours go back to inheriting
# the level the CLI chose. Every module that uses bittensor imports this one.
for _name, _logger in list(logging.root.manager.loggerDict.items()):
    if isinstance(_logger, logging.Logger) and _name.split(".")[0] in ("miner", "backends", "models"):
        _logger.setLevel(logging.NOTSET)


class StoryGenerationSynapse(bt.Synapse):
    """Inputs are typed loosely on purpose: the Axon parses the body into this class before the miner sees
    it, and a value pydantic refuses there becomes an HTTP 500 with no answer. Any JSON is accepted here
    and StoryService checks every field, answering bad input with a clear `error`."""
    # Filled by the validator.
    protocol_version: Any = Field(PROTOCOL_VERSION, description="X.Y.Z, or empty")
    task_type: Any = Field("", description="blueprint | characters | story_arc | chapters (empty allowed)")
    user_input: Any = Field("", description="The story request, any language")
    blueprint: Any = Field(None, description="Context for characters, story_arc, chapters: a JSON object")
    characters: Any = Field(None, description="Context for story_arc, chapters: a list of character objects "
                                              "(3.2.1), or {'characters': [...]} (3.2.0)")
    story_arc: Any = Field(None, description="Context for chapters: a JSON object")
    chapter_ids: Any = Field(None, description="Chapters to write: a list of whole numbers")

    # Filled by the miner; whatever a caller puts in them is dropped on the way in.
    output_data: Optional[Dict[str, Any]] = Field(None, description="The answer, or {'error': ...}")
    generation_time: float = Field(0.0, description="Seconds spent generating")
    miner_version: str = Field("", description="Miner software version")
    # Optional in 3.2.1; a 3.2.0 Dendrite types it as a required object, so the miner always fills it.
    model_info: Optional[Dict[str, Any]] = Field(None, description="What generated the answer")

    # Unused: identity comes only from synapse.dendrite.hotkey.
    miner_hotkey: Optional[str] = Field(None)
    validator_hotkey: Optional[str] = Field(None)

    @field_validator("output_data", "generation_time", "miner_version", "model_info", "miner_hotkey",
                     "validator_hotkey", mode="wrap")
    @classmethod
    def _default_if_malformed(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        """A malformed value in a field the miner fills or ignores is dropped, not a reason to refuse the
        request (a validator's Dendrite parses the miner's well-formed answer as before)."""
        try:
            return handler(value)
        except ValidationError:
            field = cls.model_fields[info.field_name]
            return field.default_factory() if field.default_factory else field.default

    def deserialize(self) -> Optional[Dict[str, Any]]:
        return self.output_data
