"""Gemini through google-genai (the maintained successor of google-generativeai, which is end-of-life).

Answers come as JSON (response MIME type application/json) shaped by the task's schema, sent as
`responseJsonSchema` after keeping only the keywords Gemini documents for it. Every call is bounded by
the request's deadline; timeouts, connection errors, 429 and 5xx are retried while the deadline allows.
`base_url` points the SDK at a proxy (or at a loopback server in tests).
"""
from __future__ import annotations

import logging
from importlib import import_module
from typing import Any, Literal

from pydantic import Field

from backends.base import BackendError, Health, ModelInfo, Request
from backends.remote import HEALTH_TIMEOUT_S, APISettings, Failure, RemoteBackend, Reply, api_key, api_schema

log = logging.getLogger(__name__)

TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
ROLES = {"user": "user", "assistant": "model"}  # system messages become the system instruction
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}  # anything else (SAFETY, ...) is a failure
# JSON Schema keywords Gemini's responseJsonSchema takes; others (string lengths, `items: false`) are
# dropped: the prompt states the lengths and the task's check enforces them.
GEMINI_KEYWORDS = {"type", "format", "title", "description", "enum", "items", "prefixItems", "minItems", "maxItems",
                   "minimum", "maximum", "anyOf", "properties", "additionalProperties", "required"}


class GeminiSettings(APISettings):
    type: Literal["gemini"]
    model: str = Field("gemini-2.0-flash", description="Gemini model name.")
    api_key_env: str = Field("GEMINI_API_KEY", description="Environment variable holding the key.")
    base_url: str | None = Field(None, description="Override the API endpoint (proxies, tests).")


def _transport_errors() -> tuple[type[Exception], ...]:
    """The SDK speaks HTTP through httpx2 or httpx, whichever is installed."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(found)


def gemini_schema(schema: Any) -> Any:
    """The task schema in the JSON Schema subset Gemini accepts; `const` becomes a one-value enum."""
    if isinstance(schema, list):
        return [gemini_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":  # names map to schemas: convert the schemas, keep every name
            out[key] = {name: gemini_schema(s) for name, s in value.items()}
        elif key in GEMINI_KEYWORDS and not (key == "items" and value is False):
            out[key] = gemini_schema(value)
    return out


def _contents(messages: list[dict[str, str]]) -> tuple[str | None, list[Any]]:
    from google.genai import types

    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [types.Content(role=ROLES[m["role"]], parts=[types.Part(text=m["content"])])
             for m in messages if m["role"] in ROLES]
    return system, turns


class GeminiBackend(RemoteBackend):
    type = "gemini"
    mode = "api"
    Settings = GeminiSettings
    provider = "gemini"

    def __init__(self, settings: GeminiSettings, client: Any):
        super().__init__(settings)
        self.client = client
        self.model = settings.model
        self.key_env = settings.api_key_env
        self.where = settings.base_url or "the Gemini API"
        self.transport_errors = _transport_errors()

    @classmethod
    def from_settings(cls, settings: GeminiSettings) -> GeminiBackend:
        from google import genai
        from google.genai import types

        key = api_key(settings, "export it with your Gemini API key")
        options = types.HttpOptions(base_url=settings.base_url, timeout=int(settings.timeout_s * 1000))
        # vertexai=False: never let GOOGLE_GENAI_USE_VERTEXAI in the environment switch the API
        return cls(settings, genai.Client(api_key=key, vertexai=False, http_options=options))

    def info(self) -> ModelInfo:
        return ModelInfo(mode=self.mode, name=self.model, provider=self.provider)

    def classify(self, error: Exception) -> Failure | None:
        from google.genai import errors

        if isinstance(error, self.transport_errors):
            return self.no_answer(error)
        if not isinstance(error, errors.APIError):
            return None
        fix = {400: "the request was rejected", 401: f"the key in {self.key_env} was refused",
               403: f"the key in {self.key_env} may not use {self.model}",
               404: f"{self.where} has no model {self.model}; check backends model"}.get(error.code, "the call failed")
        return Failure(f"{fix} (HTTP {error.code} {error.status or ''}): {error.message}",
                       transient=error.code in TRANSIENT_CODES)

    def call(self, request: Request, timeout: float) -> Any:
        from google.genai import types

        system, contents = _contents(request.messages)
        schema = {"response_mime_type": "application/json",
                  "response_json_schema": gemini_schema(api_schema(request.schema))} if request.schema else {}
        config = types.GenerateContentConfig(
            system_instruction=system, temperature=request.temperature, top_p=request.top_p,
            max_output_tokens=request.max_tokens, http_options=types.HttpOptions(timeout=int(timeout * 1000)),
            **schema)
        return self.client.models.generate_content(model=self.model, contents=contents, config=config)

    def parse(self, response: Any) -> Reply:
        if not response.candidates:
            blocked = response.prompt_feedback.block_reason if response.prompt_feedback else None
            raise BackendError(f"{self.name}: no answer" + (f" (prompt blocked: {blocked})" if blocked else ""))
        reason = response.candidates[0].finish_reason
        reason_name = getattr(reason, "value", reason) or "STOP"
        if reason_name not in FINISH_REASONS:
            raise BackendError(f"{self.name}: Gemini stopped the answer ({reason_name})")
        usage = response.usage_metadata
        return Reply(text=response.text or "", prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
                     completion_tokens=(usage.candidates_token_count or 0) if usage else 0,
                     finish_reason=FINISH_REASONS[reason_name], served_by=response.model_version)

    def health(self) -> Health:
        """Look the model up: free, and it checks both the key and the model name."""
        from google.genai import types

        options = types.GetModelConfig(http_options=types.HttpOptions(timeout=int(HEALTH_TIMEOUT_S * 1000)))
        try:
            model = self.client.models.get(model=self.model, config=options)
        except Exception as e:
            failure = self.classify(e)
            if failure is None:
                raise
            return Health(False, failure.text)
        return Health(True, f"{self.where} serves {model.name or self.model}")

    def close(self) -> None:
        self.client.close()
