"""Requests the Axon refuses before forward sees them: a synapse name it does not serve, headers or a body
that do not parse into StoryGenerationSynapse, a signature it cannot verify. bittensor answers those itself
(a body it cannot use becomes "Internal Server Error #n") and the miner would never know; this ASGI
middleware, outermost on the Axon's app, counts each one in the activity record (miner/activity.py) and
gives the validator the reason instead of a bare 500.

It reads the request body as the Axon's own middleware consumes it (no second read) and looks at it only
when the answer is a refusal: an answered request costs one list append per body chunk.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from miner.activity import Activity
from miner.protocol import StoryGenerationSynapse

MAX_BODY = 4 << 20  # what is kept for a diagnosis; a larger body is still served, and judged unreadable
REASONS = {404: "unknown synapse", 400: "headers do not parse", 401: "not verified",
           422: "body does not parse", 500: "body does not parse"}
ROUTE = StoryGenerationSynapse.__name__
STATUS_HEADER = b"bt_header_axon_status_message"

Scope = dict[str, Any]
Message = dict[str, Any]


def diagnose_body(body: bytes, headers: dict[str, str]) -> str:
    """Why a body the Axon refused cannot be a StoryGenerationSynapse, in words for the validator's log."""
    try:
        data = json.loads(body)
    except ValueError as e:
        return f"the body is not JSON ({e}); send the synapse's fields as a JSON object"
    if not isinstance(data, dict):
        return f"the body is a JSON {type(data).__name__}, not an object of the synapse's fields"
    try:
        synapse = StoryGenerationSynapse(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        return f"{where}: {first['msg']} ({e.error_count()} problems in the body)"
    except TypeError as e:
        return f"the body's keys cannot be the synapse's fields ({e})"
    sent = headers.get("computed_body_hash", "")
    if sent and synapse.body_hash != sent:
        return (f"the header computed_body_hash does not match this miner's hash of the body: the caller's "
                f"synapse hashes fields (required_hash_fields) that {ROUTE} of protocol "
                f"{synapse.__class__.model_fields['protocol_version'].default} does not")
    return "the Axon could not use the body; the miner's log has its error"


class RefusalWatch:
    def __init__(self, app: Callable[..., Awaitable[None]], activity: Activity):
        self.app, self.activity = app, activity

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[bytes] = []
        kept = 0
        held: list[Message] = []  # a refusal's start and body, until it is complete

        async def receive_kept() -> Message:
            nonlocal kept
            message = await receive()
            if message["type"] == "http.request" and kept <= MAX_BODY:
                chunk = message.get("body", b"")
                body.append(chunk)
                kept += len(chunk)
            return message

        async def send_watched(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REASONS:
                held.append(message)
                return
            if not held:
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                for out in self._refused(scope, held, b"".join(body) if kept <= MAX_BODY else None):
                    await send(out)

        await self.app(scope, receive_kept, send_watched)

    def _refused(self, scope: Scope, held: list[Message], body: bytes | None) -> list[Message]:
        """Count the refusal; the messages to send, with a clearer reason where the Axon gave none."""
        start, status = held[0], held[0]["status"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        caller = headers.get("bt_header_dendrite_hotkey")
        given = _message(b"".join(m.get("body", b"") for m in held[1:]))
        route = scope.get("path", "/").strip("/")
        version = None
        if status == 404:
            text = f"validators call /{route}; this miner serves /{ROUTE}: {given}"
        elif status in (422, 500):
            text = diagnose_body(body, headers) if body is not None else f"the body is over {MAX_BODY} bytes"
            version = _version_in(body)
        else:
            text = given
        self.activity.refused(REASONS[status], text, caller, version)
        if text == given:
            return held
        payload = json.dumps({"message": text}, ensure_ascii=False).encode("utf-8")
        # A Dendrite reads the reason from the body, then from this header, which wins
        replaced = {b"content-length": str(len(payload)).encode(),
                    STATUS_HEADER: text.encode("latin-1", "replace")}
        others = [(k, v) for k, v in start.get("headers", []) if k.lower() not in replaced]
        return [{**start, "headers": others + list(replaced.items())},
                {"type": "http.response.body", "body": payload, "more_body": False}]


def _message(payload: bytes) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload[:300].decode("utf-8", "replace")
    return str(data.get("message") or data.get("detail") or data)[:300] if isinstance(data, dict) else str(data)[:300]


def _version_in(body: bytes | None) -> Any:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    return data.get("protocol_version") if isinstance(data, dict) else None
