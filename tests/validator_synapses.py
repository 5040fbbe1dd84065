"""The synapse class as each protocol's validators declare it, for clients in the tests: a miner's answer
must parse into the validator's own class, not only into the miner's lenient one. 3.2.1's is the replica in
miner/forwarded.py; 3.2.0's field types are vya42/storyfi-subnet's. The class name is the route, so both are
called StoryGenerationSynapse."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import bittensor as bt
from pydantic import Field

from miner import forwarded


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


VALIDATOR_SYNAPSES = {"3.2.1": forwarded.StoryGenerationSynapse, "3.2.0": _storyfi_320()}

