"""Gemini through google-genai (the maintained successor of google-generativeai, which is end-of-life).

Answers come as JSON (response MIME type application/json) shaped by the task's schema, sent as
`responseJsonSchema` after keeping only the keywords Gemini documents for it. Every call is bounded by
the request's deadline; timeouts, connection errors, 429 and 5xx are retried while the deadline allows.
`base_url` points the SDK at a proxy (or at a loopback server in tests).
"""
from __future__ import annotations

import logging
import os
import time
from importlib import import_module
from typing import Any

from google import genai
from google.genai import errors, types

from backends.base import (HEALTH_TIMEOUT_S, Backend, BackendError, Generation, Health, ModelInfo, Request,
                           Retries)

log = logging.getLogger(__name__)

TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
ROLES = {"user": "user", "assistant": "model"}  # system messages become the system instruction
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}  # anything else (SAFETY, ...) is a failure
# JSON Schema keywords Gemini's responseJsonSchema takes; others (string lengths, `items: false`) are
# dropped: the prompt states the lengths and the task's check enforces them.
GEMINI_KEYWORDS = {"type", "format", "title", "description", "enum", "items", "prefixItems", "minItems", "maxItems",
                   "minimum", "maximum", "anyOf", "properties", "additionalProperties", "required"}


def _transport_errors() -> tuple[type[Exception], ...]:
    """The SDK speaks HTTP through httpx2 or httpx, whichever is installed."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


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


def _contents(messages: list[dict[str, str]]) -> tuple[str | None, list[types.Content]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [types.Content(role=ROLES[m["role"]], parts=[types.Part(text=m["content"])])
             for m in messages if m["role"] in ROLES]
    return system, turns


class GeminiBackend(Backend):
    type = "gemini"

    def __init__(self, name: str, client: genai.Client, settings: Any):
        super().__init__(name)
        self.client = client
        self.model = settings.model
        self.key_env = settings.api_key_env
        self.where = settings.base_url or "the Gemini API"
        self.timeout_s = settings.timeout_s
        self.max_retries = settings.max_retries

    @classmethod
    def from_settings(cls, settings: Any) -> GeminiBackend:
        key = os.environ.get(settings.api_key_env, "").strip()
        if not key:
            raise BackendError(f"environment variable {settings.api_key_env} (api_key_env of backend "
                               f"{settings.label}) is not set; export it with your Gemini API key")
        options = types.HttpOptions(base_url=settings.base_url, timeout=int(settings.timeout_s * 1000))
        # vertexai=False: never let GOOGLE_GENAI_USE_VERTEXAI in the environment switch the API
        return cls(settings.label, genai.Client(api_key=key, vertexai=False, http_options=options), settings)

    def info(self) -> ModelInfo:
        return ModelInfo(mode="api", name=self.model, provider="gemini")

    def _describe(self, e: errors.APIError) -> str:
        fix = {400: "the request was rejected", 401: f"the key in {self.key_env} was refused",
               403: f"the key in {self.key_env} may not use {self.model}",
               404: f"{self.where} has no model {self.model}; check backends model"}.get(e.code, "the call failed")
        return f"{fix} (HTTP {e.code} {e.status or ''}): {e.message}"

    def _config(self, request: Request, system: str | None, timeout: float) -> types.GenerateContentConfig:
        schema = {"response_mime_type": "application/json",
                  "response_json_schema": gemini_schema(request.schema)} if request.schema else {}
        return types.GenerateContentConfig(
            system_instruction=system, temperature=request.temperature, top_p=request.top_p,
            max_output_tokens=request.max_tokens, http_options=types.HttpOptions(timeout=int(timeout * 1000)),
            **schema)

    def generate(self, request: Request) -> Generation:
        started = time.monotonic()
        system, contents = _contents(request.messages)
        retries = Retries(self.name, request, self.timeout_s, self.max_retries)
        while True:
            timeout = retries.timeout()
            try:
                response = self.client.models.generate_content(
                    model=self.model, contents=contents, config=self._config(request, system, timeout))
            except errors.APIError as e:
                if e.code not in TRANSIENT_CODES:
                    raise BackendError(f"{self.name}: {self._describe(e)}") from None
                retries.failed(self._describe(e))
            except TRANSPORT_ERRORS as e:
                retries.failed(f"{self.where} did not answer ({type(e).__name__}: {e})")
            else:
                return self._generation(response, time.monotonic() - started)

    def _generation(self, response: types.GenerateContentResponse, seconds: float) -> Generation:
        if not response.candidates:
            blocked = response.prompt_feedback.block_reason if response.prompt_feedback else None
            raise BackendError(f"{self.name}: no answer" + (f" (prompt blocked: {blocked})" if blocked else ""))
        reason = response.candidates[0].finish_reason
        reason_name = getattr(reason, "value", reason) or "STOP"
        if reason_name not in FINISH_REASONS:
            raise BackendError(f"{self.name}: Gemini stopped the answer ({reason_name})")
        text = response.text or ""
        if not text.strip():
            raise BackendError(f"{self.name}: empty answer ({reason_name})")
        usage = response.usage_metadata
        served = self.info()
        if response.model_version and response.model_version != self.model:
            served = ModelInfo(served.mode, served.name, served.provider, response.model_version)
        return Generation(text=text, prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
                          completion_tokens=(usage.candidates_token_count or 0) if usage else 0,
                          seconds=seconds, backend=self.name, model=served,
                          finish_reason=FINISH_REASONS[reason_name])

    def health(self) -> Health:
        """Look the model up: free, and it checks both the key and the model name."""
        options = types.GetModelConfig(http_options=types.HttpOptions(timeout=int(HEALTH_TIMEOUT_S * 1000)))
        try:
            model = self.client.models.get(model=self.model, config=options)
        except errors.APIError as e:
            return Health(False, self._describe(e))
        except TRANSPORT_ERRORS as e:
            return Health(False, f"{self.where} did not answer ({type(e).__name__}: {e})")
        return Health(True, f"{self.where} serves {model.name or self.model}")

    def close(self) -> None:
        self.client.close()
