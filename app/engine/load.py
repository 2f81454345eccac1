"""Choosing the backend named by the settings (`VEIL_BACKEND`, `veil serve --backend`), or the default one."""

from __future__ import annotations

import torch

from app.engine import llamacpp
from app.engine.request import Backend
from app.model_runner import ModelRunner, gguf_path
from app.settings import ServerSettings


def backend_name(runner: ModelRunner, settings: ServerSettings) -> str:
    """The backend the settings name; unset, llamacpp when it is installed and can run this model on the CPU, else
    transformers."""
    if settings.backend is not None:
        return settings.backend
    if settings.device == "cpu" and llamacpp.available() and gguf_path(runner.model_id) is not None:
        return "llamacpp"
    return "transformers"


def load_backend(runner: ModelRunner, settings: ServerSettings, name: str) -> Backend:
    """The backend `name` (see `backend_name`) that generates for the service; `runner` (the model on this process)
    serves the tokenizer and the embedding table either way."""
    if name == "vllm":
        from app.engine.vllm import VllmBackend

        return VllmBackend.load(runner, settings)
    if name == "llamacpp":
        return llamacpp.LlamaCppBackend.load(runner, settings)
    from app.engine.transformers import TransformersBackend

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return TransformersBackend(runner, max_batch=settings.max_batch_size, window=settings.batch_window_ms / 1000,
                               max_queue=settings.max_queue)
