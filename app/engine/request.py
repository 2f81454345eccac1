"""What a backend is given (soft prompt, reconstructed prompt, generation parameters, cancellation, deadline) and
what it gives back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch

from app.engine.text import TextStream


@dataclass
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one batch; None: this one runs alone (seeded sampling must reproduce
        what it would alone, which a batch cannot promise)."""
        if self.temperature > 0 and self.seed is not None:
            return None
        return (self.temperature, self.top_p)


@dataclass(frozen=True, eq=False)
class SoftPromptPrefix:
    """A soft prompt as the engine sees it: the artifact's name and its (m x b) embeddings.

    A reload loads new tensors, so (name, tensor) identifies one version of an artifact: requests with the same
    `key` share it, and a backend may cache what it computes from it (its keys and values)."""

    name: str
    embeddings: torch.Tensor

    @property
    def key(self) -> tuple[str, int]:
        return self.name, id(self.embeddings)


@dataclass(eq=False)  # compared by identity
class EngineRequest:
    """One generation: the soft prompt (or none) goes before the reconstructed prompt `embeds` (T x b)."""

    prefix: SoftPromptPrefix | None
    embeds: torch.Tensor
    params: GenerationParams
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set from any thread (the client went away): generation stops at the next token."""
    deadline: float | None = None
    """time.monotonic() past which generation stops and the request fails with DeadlineExceeded."""
    on_text: Callable[[str], None] | None = None
    """Called from the engine's thread with each new piece of text (stop strings held back until ruled out)."""

    def batch_key(self) -> tuple | None:
        key = self.params.batch_key()
        return None if key is None else (*key, self.prefix.key if self.prefix else None)


FinishReason = Literal["stop", "length", "cancelled", "deadline"]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # every new token, an end-of-sequence token included
    finish_reason: FinishReason

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


class Backend(Protocol):
    """Runs EngineRequests. `submit` raises Overloaded when it cannot take more; the future fails with
    DeadlineExceeded when a request runs past its deadline, and ends with finish_reason 'cancelled' once cancelled."""

    def submit(self, request: EngineRequest) -> Future[Completion]: ...

    def close(self) -> None: ...


def finish_reason(request: EngineRequest, stream: TextStream, token: int, eos: set[int]) -> FinishReason | None:
    """Why this request ends with this new token, if it does (the token is kept unless the request is gone)."""
    if request.cancelled.is_set():
        return "cancelled"
    if request.deadline is not None and time.monotonic() > request.deadline:
        return "deadline"
    if token in eos:
        stream.ids.append(token)  # counted, never shown
        return "stop"
    if stream.push(token):
        return "stop"
    return "length" if len(stream.ids) >= request.params.max_new_tokens else None


def send_text(request: EngineRequest, stream: TextStream, finished: bool) -> None:
    """Hand the request's listener the text that is safe to send; a listener that fails cancels its request."""
    if request.on_text is None or request.cancelled.is_set():
        return
    piece = stream.take(finished)
    if piece:
        try:
            request.on_text(piece)
        except Exception:  # the consumer is gone: one request must never fail the batch
            request.cancelled.set()
