"""Choosing the backend named by the settings (`VEIL_BACKEND`, `veil serve --backend`)."""

from __future__ import annotations

from app.engine.request import Backend
from app.model_runner import ModelRunner
from app.settings import ServerSettings


def load_backend(runner: ModelRunner, settings: ServerSettings) -> Backend:
    """The backend that generates for the service; `runner` (the model on this process) serves the tokenizer and
    the embedding table either way."""
    if settings.backend == "vllm":
        from app.engine.vllm import VllmBackend

        return VllmBackend.load(runner, settings)
    from app.engine.transformers import TransformersBackend

    return TransformersBackend(runner, max_batch=settings.max_batch_size, window=settings.batch_window_ms / 1000,
                               max_queue=settings.max_queue)
