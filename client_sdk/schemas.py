"""JSON bodies of the HTTP API, shared by the client and the server (the binary payload is in `wire`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProjectionInfo(BaseModel):
    """A projection the client can use: its projected table (vocab x k) and clip c."""

    id: str = Field(description="first 8 bytes (16 hex chars) of the projected table file's SHA-256")
    dim: int = Field(description="k, the projected width")
    clip: float = Field(description="c: each coordinate is clipped to [-c, c] before quantization")
    table_url: str
    table_sha256: str


class SoftPromptInfo(BaseModel):
    """A trained soft prompt and the mechanism settings it was trained for."""

    name: str
    projection_id: str
    bits: int
    mu: float
    virtual_tokens: int


class MechanismDefaults(BaseModel):
    """The settings a client uses unless told otherwise."""

    projection_id: str
    bits: int
    mu: float


class BundleInfo(BaseModel):
    """GET /v1/bundle: what a client needs to privatize prompts for this server."""

    model_id: str
    vocab_size: int
    hidden_size: int
    wire_version: int
    max_prompt_tokens: int
    tokenizer_url: str
    tokenizer_sha256: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    projections: list[ProjectionInfo]
    soft_prompts: list[SoftPromptInfo] = []
    defaults: MechanismDefaults


class GenerateResponse(BaseModel):
    """POST /v1/generate: the answer and what the server did."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    soft_prompt: str | None = Field(default=None, description="name of the soft prompt prepended, if any")
    soft_prompt_mu: float | None = Field(default=None, description="the mu that soft prompt was trained for")
    soft_prompt_exact: bool = Field(default=False, description="whether it was trained for exactly this mu "
                                    "(otherwise it is the nearest in log scale for this projection and n)")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")


class ErrorResponse(BaseModel):
    """Every 4xx body."""

    error: str
    detail: str
