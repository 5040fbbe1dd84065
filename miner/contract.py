"""What a validator and this miner agree on beyond the synapse's fields (docs/protocol.md), said once: the
validators' timeout, the fields the miner adds to an answer, what an error answer carries, and how an
answer is read back as a validator reads it. The service writes answers with it; demo, loadtest, bench and
the tests read them with it. No bittensor here: the synapse itself is miner/protocol.py."""
from __future__ import annotations

from typing import Any

VALIDATOR_TIMEOUT_S = 60.0  # what validators give a request (Dendrite timeout); also the default off the Axon
# Validators deserialize, so they see only output_data: the miner reports there what made the answer and how
# long it took, beside the answer's own keys (3.2.1 reads both from output_data).
MINER_FIELDS = ("model_info", "generation_time")
# An answer that could not be made is {"error": text, "error_kind": one of these}: what the caller may do.
ERROR_KINDS = {
    "input": "the request's fields cannot be used: sending it again will not help",
    "busy": "every backend tried was too busy to answer in time: not a fault, ask again later",
    "failed": "no backend could answer (each one's reason is in the text)",
    "internal": "a bug in the miner: its log has the traceback",
}


def with_miner_fields(answer: dict[str, Any], model_info: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**answer, "model_info": model_info, "generation_time": round(seconds, 3)}


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
