"""The synapse class as each protocol's validators declare it, for clients in the tests: a miner's answer
must parse into the validator's own class, not only into the miner's lenient one. Field types as in
StorynetAI/storynet-subnet template/protocol.py (3.2.1) and vya42/storyfi-subnet (3.2.0); the class name is
the route, so both are called StoryGenerationSynapse."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import bittensor as bt
from pydantic import Field


def _storynet_321() -> type[bt.Synapse]:
    class StoryGenerationSynapse(bt.Synapse):
        protocol_version: str = "3.2.1"
        task_type: str = ""
        user_input: str = ""
        blueprint: Optional[Dict[str, Any]] = None
        characters: Optional[List[Dict[str, Any]]] = None
        story_arc: Optional[Dict[str, Any]] = None
        chapter_ids: Optional[List[int]] = None
        output_data: Optional[Dict[str, Any]] = None
        generation_time: float = 0.0
        miner_version: str = ""
        model_info: Optional[Dict[str, Any]] = None
        miner_hotkey: Optional[str] = None
        validator_hotkey: Optional[str] = None

        def deserialize(self) -> Optional[Dict[str, Any]]:
            return self.output_data

    return StoryGenerationSynapse


def _storyfi_320() -> type[bt.Synapse]:
    class StoryGenerationSynapse(bt.Synapse):
        protocol_version: str = "3.2.0"
        task_type: str = ""
        user_input: str = ""
        blueprint: Optional[Dict[str, Any]] = None
        characters: Optional[Dict[str, Any]] = None
        story_arc: Optional[Dict[str, Any]] = None
        chapter_ids: Optional[List[int]] = None
        output_data: Optional[Dict[str, Any]] = None
        generation_time: float = 0.0
        miner_version: str = ""
        model_info: Dict[str, Any] = Field(default_factory=lambda: {"mode": "unknown", "name": "unknown"})
        miner_hotkey: Optional[str] = None
        validator_hotkey: Optional[str] = None

        def deserialize(self) -> Optional[Dict[str, Any]]:
            return self.output_data

    return StoryGenerationSynapse


VALIDATOR_SYNAPSES = {"3.2.1": _storynet_321(), "3.2.0": _storyfi_320()}


def read_as_321(output: Dict[str, Any]) -> tuple[Dict[str, Any], Any, Any]:
    """(answer, model_info, generation_time) the way a 3.2.1 validator reads a deserialized answer."""
    model_info = output.get("model_info") or output.get("_model_info")
    answer = {k: v for k, v in output.items() if k not in ("model_info", "_model_info", "generation_time")}
    return answer, model_info, output.get("generation_time")
