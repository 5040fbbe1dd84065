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
import threading
from typing import Any, Callable, Literal

from pydantic import Field

from backends.base import BackendError, Health, ModelInfo, Request
from backends.remote import (HEALTH_TIMEOUT_S, APISettings, Failure, RemoteBackend, Reply, api_key, api_schema,
                             redact)

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"  # explicit, so OPENAI_BASE_URL in the environment is never used
NO_KEY = "none"  # servers without auth still want a non-empty bearer token


class OpenAISettings(APISettings):
    type: Literal["openai"]
    model: str = Field(..., description="Model name as the server knows it, e.g. gpt-4o-mini.")
    base_url: str | None = Field(None, description="OpenAI-compatible server (vLLM, llama.cpp server, ollama); empty: OpenAI.")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable holding the key; null for servers without one.")
    structured_output: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="json_schema sends the task's schema; json_object for servers without it.")


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
FIXES = {  # by exception class name: the SDK itself is imported only when this backend is used
    "AuthenticationError": "the server refused the API key in {key}; check the key",
    "PermissionDeniedError": "the key in {key} may not use model {model}; check the account",
    "NotFoundError": "{where} has no model {model} (or no chat API there); check backends model and base_url",
    "BadRequestError": "{where} rejected the request",
}


def _rejects_format(e: Any) -> bool:
    """Servers say so differently (OpenAI 400, vLLM 400/422, llama-cpp-python 500), but name the field."""
    return e.status_code in (400, 422, 500) and "response_format" in str(e.message)


def _with_schema_in_prompt(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    note = "Answer with one JSON object that follows this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return [{"role": "system", "content": note}, *messages]


class OpenAIBackend(RemoteBackend):
    type = "openai"
    mode = "api"
    Settings = OpenAISettings

    def __init__(self, settings: OpenAISettings, client: Any):
        super().__init__(settings)
        self.client = client
        self.model = settings.model
        self.where = settings.base_url or OPENAI_URL
        self.key_env = settings.api_key_env
        self.provider = "openai" if settings.base_url is None else "openai-compatible"
        self._format = FIRST_FORMAT[settings.structured_output]
        self._format_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: OpenAISettings) -> OpenAIBackend:
        import openai

        if settings.api_key_env is None and settings.base_url is None:
            raise BackendError(f"backend {settings.label}: OpenAI needs a key; set api_key_env to the name of "
                               f"the environment variable that holds it")
        key = api_key(settings, "export it, or set api_key_env: null for a server that needs no key")
        client = openai.OpenAI(api_key=key or NO_KEY, base_url=settings.base_url or OPENAI_URL,
                               timeout=settings.timeout_s, max_retries=0)
        return cls(settings, client)

    def info(self) -> ModelInfo:
        return ModelInfo(mode=self.mode, name=self.model, provider=self.provider,
                         parameters={"structured_output": FORMATS[self._format][0]})

    def classify(self, error: Exception) -> Failure | None:
        import openai

        if isinstance(error, openai.APIConnectionError):  # timeouts included
            return self.no_answer(error)
        if not isinstance(error, openai.APIError):
            return None
        fix = next((text for name, text in FIXES.items() if type(error).__name__ == name), "the call failed")
        status = getattr(error, "status_code", None)
        text = (f"{fix.format(key=self.key_env, model=self.model, where=self.where)}"
                f"{f' (HTTP {status})' if status else ''}: {error.message}")
        return Failure(text, transient=isinstance(error, (openai.RateLimitError, openai.InternalServerError)))

    def _step_down(self, e: Any, used: int) -> bool:
        """After the server refused response format `used`, move to the next one; False if none is left."""
        with self._format_lock:
            if used + 1 >= len(FORMATS):
                return False
            self._format = max(self._format, used + 1)
        log.warning("%s: %s refused response_format %s (%s); using %s from now on", self.name, self.where,
                    FORMATS[used][0], redact(e.message)[:120], FORMATS[self._format][0])
        return True

    def call(self, request: Request, timeout: float) -> Any:
        """A server that refuses the JSON format is asked again at once with the next one."""
        import openai

        while True:
            fmt = self._format
            messages = request.messages
            extra: dict[str, Any] = {}
            if request.schema is not None:
                name, make = FORMATS[fmt]
                schema = api_schema(request.schema)
                extra["response_format"] = make(schema)
                if name == "json_object":
                    messages = _with_schema_in_prompt(messages, schema)
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=request.max_tokens,
                    temperature=request.temperature, top_p=request.top_p,
                    timeout=min(timeout, max(request.seconds_left(), 0.1)), **extra)
            except openai.APIStatusError as e:
                if not (request.schema is not None and _rejects_format(e) and self._step_down(e, fmt)):
                    raise

    def parse(self, response: Any) -> Reply:
        if not response.choices:
            raise BackendError(f"{self.name}: {self.where} answered with no choices")
        choice = response.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise BackendError(f"{self.name}: the model refused: {refusal}")
        usage = response.usage
        return Reply(text=choice.message.content or "", prompt_tokens=usage.prompt_tokens if usage else 0,
                     completion_tokens=usage.completion_tokens if usage else 0,
                     finish_reason="length" if choice.finish_reason == "length" else "stop",
                     served_by=response.model)

    def health(self) -> Health:
        """List the server's models (free; checks the key and the model name). A model the list lacks
        (or a server without a list) gets a one-token completion: some servers take names they don't list."""
        import openai

        try:
            ids = [m.id for m in self.client.models.list(timeout=HEALTH_TIMEOUT_S).data]
        except openai.NotFoundError:
            ids = []
        except openai.APIError as e:
            return Health(False, self.classify(e).text)
        if self.model in ids:
            return Health(True, f"{self.where} serves {self.model}")
        try:
            self.client.chat.completions.create(model=self.model, max_tokens=1, timeout=HEALTH_TIMEOUT_S,
                                                messages=[{"role": "user", "content": "Say OK."}])
        except openai.APIError as e:
            listed = f"; it lists: {', '.join(ids[:8])}" if ids else ""
            return Health(False, self.classify(e).text + listed)
        unlisted = f" (not in its model list: {', '.join(ids[:8])})" if ids else ""
        return Health(True, f"{self.where} answered a one-token request for {self.model}{unlisted}")

    def close(self) -> None:
        self.client.close()
