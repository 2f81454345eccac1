"""OpenAI's Chat Completions format as the gateway speaks it: the request it accepts, the objects it answers with,
and its error bodies. Nothing here privatizes or sends anything.

Every request field is either supported, accepted only at its no-op value (`n: 1`, `logprobs: false`, ...), or
refused with a 400 naming it: a field is never dropped silently. A null field counts as absent.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's own limit
NO_OP_VALUES: dict[str, object] = {"n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0,
                                   "logit_bias": {}, "response_format": {"type": "text"}, "modalities": ["text"]}
"""Fields veil does not implement, accepted only at the value that asks for nothing."""
WHY_UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "parallel_tool_calls": "tool calls", "n": "more than one choice",
    "logprobs": "log probabilities", "top_logprobs": "log probabilities", "response_format": "structured output",
    "modalities": "outputs other than text", "audio": "audio", "frequency_penalty": "penalties",
    "presence_penalty": "penalties", "logit_bias": "logit bias", "prediction": "predicted outputs",
    "metadata": "stored completions (a text field veil would not send)", "store": "stored completions",
    "reasoning_effort": "reasoning models", "web_search_options": "web search", "service_tier": "service tiers",
}


class GatewayError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        for part in value if isinstance(value, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
        return value

    def texts(self) -> list[str]:
        return [self.content] if isinstance(self.content, str) else [part.text for part in self.content]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. `model` is accepted and answered with the served model's id."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        stops = [value] if isinstance(value, str) else value
        if isinstance(stops, list) and not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_chat_request(body: object) -> ChatCompletionRequest:
    """The request, or a GatewayError (400) naming the first field that is wrong or not supported."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object", code="invalid_body")
    fields = {}
    for name, value in body.items():
        if value is None or NO_OP_VALUES.get(name, object()) == value:
            continue
        if name in WHY_UNSUPPORTED:
            raise GatewayError(400, f"unsupported field {name!r}: veil does not support {WHY_UNSUPPORTED[name]}",
                               code="unsupported_field", param=name)
        fields[name] = value
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        if first["type"] == "extra_forbidden":
            raise GatewayError(400, f"unsupported field {param!r}", code="unsupported_field", param=param) from None
        raise GatewayError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None


def completion_id() -> str:
    return f"chatcmpl-veil-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, text: str, finish_reason: str, usage: dict, veil: dict) -> dict:
    """A `chat.completion` object; `veil` (the privacy spent) is a field OpenAI clients ignore."""
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage, "veil": veil}


def chunk(id: str, model: str, delta: dict | None, finish_reason: str | None = None, **extra: object) -> dict:
    """A `chat.completion.chunk`; with delta None, the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
