"""OpenAI's Chat Completions format (and the legacy Completions format) as the gateway speaks them: the requests it
accepts, the objects it answers with, and its error bodies. Nothing here privatizes or sends anything.

Every request field is either supported, accepted only at its no-op value (`n: 1`, `logprobs: false`, ...), or
refused with a 400 naming it: a field is never dropped silently. A null field counts as absent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's own limit
NO_OP_VALUES: dict[str, object] = {"n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0,
                                   "logit_bias": {}, "response_format": {"type": "text"}, "modalities": ["text"],
                                   "best_of": 1, "echo": False}
"""Fields veil does not implement, accepted only at the value that asks for nothing."""
WHY_UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "parallel_tool_calls": "tool calls", "n": "more than one choice",
    "logprobs": "log probabilities", "top_logprobs": "log probabilities", "response_format": "structured output",
    "modalities": "outputs other than text", "audio": "audio", "frequency_penalty": "penalties",
    "presence_penalty": "penalties", "logit_bias": "logit bias", "prediction": "predicted outputs",
    "metadata": "stored completions (a text field veil would not send)", "store": "stored completions",
    "reasoning_effort": "reasoning models", "web_search_options": "web search", "service_tier": "service tiers",
    "best_of": "more than one choice", "echo": "echoing the prompt", "suffix": "insertion",
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


class GenerationRequest(BaseModel):
    """The fields both endpoints share. `model` is accepted and answered with the served model's id."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
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

    def conversation(self) -> list[tuple[str, list[str]]]:
        """(role, texts) of each message."""
        raise NotImplementedError


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[tuple[str, list[str]]]:
        return [(m.role, m.texts()) for m in self.messages]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt, continued as written (no chat template)."""

    prompt: str | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request")
        return value

    def conversation(self) -> list[tuple[str, list[str]]]:
        return [("user", [self.prompt if isinstance(self.prompt, str) else self.prompt[0]])]


def parse_request(body: object, kind: type[GenerationRequest]) -> GenerationRequest:
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
        return kind.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        if first["type"] == "extra_forbidden":
            raise GatewayError(400, f"unsupported field {param!r}", code="unsupported_field", param=param) from None
        raise GatewayError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None


@dataclass(frozen=True)
class ResponseFormat:
    """How one endpoint writes its answers: `chat.completion` (a message, deltas) or `text_completion` (text)."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def completion_id(self) -> str:
        return f"{self.id_prefix}-veil-{uuid.uuid4().hex}"

    def _choice(self, text: str | None, finish_reason: str | None, streamed: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        content = {} if text is None else {"content": text}
        body = content if streamed else {"role": "assistant", **content}
        return {"index": 0, "delta" if streamed else "message": body, "logprobs": None, "finish_reason": finish_reason}

    def completion(self, id: str, model: str, text: str, finish_reason: str, usage: dict, veil: dict) -> dict:
        """The whole answer; `veil` (the privacy spent) is a field OpenAI clients ignore."""
        return {"id": id, "object": self.object, "created": int(time.time()), "model": model,
                "choices": [self._choice(text, finish_reason, False)], "usage": usage, "veil": veil}

    def chunk(self, id: str, model: str, text: str | None, finish_reason: str | None = None, **extra: object) -> dict:
        """A streamed piece (text None: the end, with `finish_reason`)."""
        return {"id": id, "object": self.chunk_object, "created": int(time.time()), "model": model,
                "choices": [self._choice(text, finish_reason, True)], **extra}

    def start_chunk(self, id: str, model: str) -> dict | None:
        """The chunk that opens a stream: the assistant's role, in the chat format."""
        if not self.chat:
            return None
        chunk = self.chunk(id, model, "")
        chunk["choices"][0]["delta"]["role"] = "assistant"
        return chunk

    def usage_chunk(self, id: str, model: str, usage: dict, **extra: object) -> dict:
        return {"id": id, "object": self.chunk_object, "created": int(time.time()), "model": model, "choices": [],
                "usage": usage, **extra}


CHAT = ResponseFormat("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
TEXT = ResponseFormat("text_completion", "text_completion", "cmpl", chat=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
