"""What a validator and this miner agree on beyond the synapse's fields (docs/protocol.md), said once: the
validators' timeout, the fields the miner adds to an answer, what an error answer carries, and how an
answer is read back as a validator reads it. The service writes answers with it; demo, loadtest, bench and
the tests read them with it (miner/forwarded.py reads them as a 3.2.1 validator rebuilds them). No
bittensor here: the synapse itself is miner/protocol.py."""
from __future__ import annotations

from typing import Any

VALIDATOR_TIMEOUT_S = 60.0  # what validators give a request (Dendrite timeout); also the default off the Axon
TASK_TYPES = ("blueprint", "characters", "story_arc", "chapters")  # what the synapse's task_type accepts, besides ""
# Validators deserialize, so they see only output_data: the miner reports there the request's task, what made
# the answer and how long it took, beside the answer's own keys. A 3.2.1 validator sets every key of
# output_data that names a synapse field on a fresh synapse, which validates it, and forwards these three
# from there to the scoring service: each must be in the type that field takes (task_type a str that is ""
# or one of TASK_TYPES, model_info an object, generation_time a float). Every output_data carries all three,
# error answers too; every other key is the task's contract (miner/tasks/task.py keeps only those).
MINER_FIELDS = ("task_type", "model_info", "generation_time")
# An answer that could not be made is {"error": text, "error_kind": one of these}: what the caller may do.
ERROR_KINDS = {
    "input": "the request's fields cannot be used: sending it again will not help",
    "busy": "every backend tried was too busy to answer in time: not a fault, ask again later",
    "failed": "no backend could answer (each one's reason is in the text)",
    "internal": "a bug in the miner: its log has the traceback",
}


def unknown_model_info() -> dict[str, Any]:
    """model_info when nothing was generated: no model is claimed."""
    return {"mode": "unknown", "name": "unknown", "version": None, "provider": None, "parameters": {}}


def forwarded_task_type(task_type: Any) -> str:
    """The request's task_type as the synapse field takes it: anything it would refuse becomes ""."""
    return task_type if isinstance(task_type, str) and task_type in TASK_TYPES else ""


def with_miner_fields(output: dict[str, Any], task_type: Any, model_info: dict[str, Any] | None,
                      seconds: float) -> dict[str, Any]:
    """output_data: an answer or an error answer, with the miner's fields (model_info None: nothing generated)."""
    return {**output, "task_type": forwarded_task_type(task_type),
            "model_info": model_info if model_info is not None else unknown_model_info(),
            "generation_time": round(float(seconds), 3)}


def error_answer(kind: str, text: str) -> dict[str, Any]:
    assert kind in ERROR_KINDS, kind
    return {"error": text, "error_kind": kind}


def answer_of(output: dict[str, Any]) -> dict[str, Any]:
    """The answer itself, as a validator's scoring sees it: output_data less the miner's fields."""
    return {k: v for k, v in output.items() if k not in MINER_FIELDS}


def error_of(output: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, text) of an error answer; None for an answer. An error from a miner that gives no kind is
    'failed'."""
    if "error" not in output:
        return None
    kind = output.get("error_kind")
    return (kind if kind in ERROR_KINDS else "failed"), str(output["error"])
