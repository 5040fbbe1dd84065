"""OpenAI, or any OpenAI-compatible server (vLLM, llama.cpp's server, ollama, a gateway) via `base_url`.

Output is held to the task's JSON schema the best way the server allows: the `json_schema` response
format (OpenAI, vLLM, llama.cpp's server), else `json_object` carrying the schema (llama-cpp-python's
server), else plain JSON mode with the schema in the prompt. A server that rejects a format is asked with
the next one from then on. Every call is bounded by the request's deadline; timeouts, connection errors,
429 and 5xx are retried while the deadline allows. The schema is sent with strict=False: OpenAI's strict
mode refuses keywords the task schemas use (prefixItems, const, lengths); the task's check is the judge.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

import openai

from backends.base import (HEALTH_TIMEOUT_S, Backend, BackendError, Generation, Health, ModelInfo, Request,
                           Retries)

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"  # explicit, so OPENAI_BASE_URL in the environment is never used
NO_KEY = "none"  # servers without auth still want a non-empty bearer token


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": False}}


def _json_object_with_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_object", "schema": schema}


def _json_object(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_object"}


# Ways to ask for JSON, most exact first; `structured_output` says where to start.
FORMATS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("json_schema", _json_schema), ("json_object+schema", _json_object_with_schema), ("json_object", _json_object)]
FIRST_FORMAT = {"json_schema": 0, "json_object": 2}
TRANSIENT = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)  # timeouts included
FIXES = {
    openai.AuthenticationError: "the server refused the API key in {key}; check the key",
    openai.PermissionDeniedError: "the key in {key} may not use model {model}; check the account",
    openai.NotFoundError: "{where} has no model {model} (or no chat API there); check backends model and base_url",
    openai.BadRequestError: "{where} rejected the request",
}


def _rejects_format(e: openai.APIStatusError) -> bool:
    """Servers say so differently (OpenAI 400, vLLM 400/422, llama-cpp-python 500), but name the field."""
    return e.status_code in (400, 422, 500) and "response_format" in str(e.message)


def _with_schema_in_prompt(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    note = "Answer with one JSON object that follows this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return [{"role": "system", "content": note}, *messages]


class OpenAIBackend(Backend):
    type = "openai"

    def __init__(self, name: str, client: openai.OpenAI, settings: Any):
        super().__init__(name)
        self.client = client
        self.model = settings.model
        self.where = settings.base_url or OPENAI_URL
        self.key_env = settings.api_key_env
        self.timeout_s = settings.timeout_s
        self.max_retries = settings.max_retries
        self.provider = "openai" if settings.base_url is None else "openai-compatible"
        self._format = FIRST_FORMAT[settings.structured_output]
        self._format_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> OpenAIBackend:
        key = None
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env, "").strip()
            if not key:
                raise BackendError(
                    f"environment variable {settings.api_key_env} (api_key_env of backend {settings.label}) is not "
                    f"set; export it, or set api_key_env: null for a server that needs no key")
        elif settings.base_url is None:
            raise BackendError(f"backend {settings.label}: OpenAI needs a key; set api_key_env to the name of "
                               f"the environment variable that holds it")
        client = openai.OpenAI(api_key=key or NO_KEY, base_url=settings.base_url or OPENAI_URL,
                               timeout=settings.timeout_s, max_retries=0)
        return cls(settings.label, client, settings)

    def info(self) -> ModelInfo:
        return ModelInfo(mode="api", name=self.model, provider=self.provider,
                         parameters={"structured_output": FORMATS[self._format][0]})

    def _describe(self, e: openai.APIError) -> str:
        fix = next((text for cls, text in FIXES.items() if isinstance(e, cls)), "the call failed")
        status = getattr(e, "status_code", None)
        return (f"{fix.format(key=self.key_env, model=self.model, where=self.where)}"
                f"{f' (HTTP {status})' if status else ''}: {e.message}")

    def _step_down(self, e: openai.APIStatusError, used: int) -> bool:
        """After the server refused response format `used`, move to the next one; False if none is left."""
        with self._format_lock:
            if used + 1 >= len(FORMATS):
                return False
            self._format = max(self._format, used + 1)
        log.warning("%s: %s refused response_format %s (%s); using %s from now on", self.name, self.where,
                    FORMATS[used][0], e.message[:120], FORMATS[self._format][0])
        return True

    def _create(self, request: Request, timeout: float, fmt: int):
        messages = request.messages
        extra: dict[str, Any] = {}
        if request.schema is not None:
            name, make = FORMATS[fmt]
            extra["response_format"] = make(request.schema)
            if name == "json_object":
                messages = _with_schema_in_prompt(messages, request.schema)
        return self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, timeout=timeout, **extra)

    def generate(self, request: Request) -> Generation:
        started = time.monotonic()
        retries = Retries(self.name, request, self.timeout_s, self.max_retries)
        while True:
            timeout = retries.timeout()
            fmt = self._format
            try:
                response = self._create(request, timeout, fmt)
            except openai.APIStatusError as e:
                if request.schema is not None and _rejects_format(e) and self._step_down(e, fmt):
                    continue
                if not isinstance(e, TRANSIENT):
                    raise BackendError(f"{self.name}: {self._describe(e)}") from None
                retries.failed(self._describe(e))
            except openai.APIConnectionError as e:
                retries.failed(f"{self.where} did not answer ({type(e).__name__}: {e})")
            except openai.APIError as e:
                raise BackendError(f"{self.name}: {self._describe(e)}") from None
            else:
                return self._generation(response, time.monotonic() - started)

    def _generation(self, response: Any, seconds: float) -> Generation:
        if not response.choices:
            raise BackendError(f"{self.name}: {self.where} answered with no choices")
        choice = response.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise BackendError(f"{self.name}: the model refused: {refusal}")
        text = choice.message.content or ""
        if not text.strip():
            raise BackendError(f"{self.name}: empty answer (finish_reason {choice.finish_reason})")
        usage = response.usage
        served = self.info()
        if response.model and response.model != self.model:  # e.g. the dated snapshot OpenAI really used
            served = ModelInfo(served.mode, served.name, served.provider, response.model, served.parameters)
        return Generation(text=text, prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0, seconds=seconds,
                          backend=self.name, model=served,
                          finish_reason="length" if choice.finish_reason == "length" else "stop")

    def health(self) -> Health:
        """List the server's models (free; checks the key and the model name). A model the list lacks
        (or a server without a list) gets a one-token completion: some servers take names they don't list."""
        try:
            ids = [m.id for m in self.client.models.list(timeout=HEALTH_TIMEOUT_S).data]
        except openai.NotFoundError:
            ids = []
        except openai.APIError as e:
            return Health(False, self._describe(e))
        if self.model in ids:
            return Health(True, f"{self.where} serves {self.model}")
        try:
            self.client.chat.completions.create(model=self.model, max_tokens=1, timeout=HEALTH_TIMEOUT_S,
                                                messages=[{"role": "user", "content": "Say OK."}])
        except openai.APIError as e:
            listed = f"; it lists: {', '.join(ids[:8])}" if ids else ""
            return Health(False, self._describe(e) + listed)
        unlisted = f" (not in its model list: {', '.join(ids[:8])})" if ids else ""
        return Health(True, f"{self.where} answered a one-token request for {self.model}{unlisted}")

    def close(self) -> None:
        self.client.close()
