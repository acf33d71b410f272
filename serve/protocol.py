"""The OpenAI wire format: request schemas (pydantic, strict), errors, ids.

Requests are validated strictly (no "5" for 5, no true for 1): a client that sends the wrong type
gets a 422 naming the field, not a silently coerced value. Unknown top-level fields are accepted
and ignored, as OpenAI-compatible servers do for parameters they do not implement, except the
ones whose absence would change the answer (tools, logprobs, ...), which are refused (400).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "response_format",
               "best_of", "suffix", "echo")
"""Parameters that change the answer and that the built-in engine does not implement."""


class APIError(Exception):
    """An error returned to the client as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RagOptions(_Strict):
    """The `rag` extension field (sent by the openai client through extra_body)."""

    enabled: bool | None = None
    top_k: int | None = Field(None, ge=1)
    mode: Literal["hybrid", "bm25", "dense"] | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")      # name, tool_call_id, ... are passed on
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    rag: RagOptions | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate max_tokens tokens whatever the model says (benchmarks)."""
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        out = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(out) > 4 or any(not s for s in out):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop", code="invalid_value")
        return out


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; APIError 400 for bytes that are not one JSON value."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:     # orjson refuses integers beyond 64 bits, which JSON allows: the stdlib decides
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise APIError(400, f"the request body is not valid JSON ({msg}); send one JSON object",
                       code="invalid_json") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def validate(model: type[BaseModel], data: Any) -> Any:
    """`model` of `data`; APIError 422 naming the first field at fault."""
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_type")
    for name in UNSUPPORTED:
        if data.get(name) not in (None, False, [], {}):
            raise APIError(400, f"{name!r} is not supported by this server", param=name, code="unsupported_parameter")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and p in _TYPE_BRANCHES))
        raise APIError(422, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", param=loc or None,
                       code=str(err.get("type", "invalid_value"))) from None


# Pydantic names the union branch it tried ('str', 'list[...]') in error locations; not a field.
_TYPE_BRANCHES = {"str", "int", "float", "bool", "list[str]", "list[TextPart]", "TextPart"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
