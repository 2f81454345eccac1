"""Training runs as jobs: one function that runs a config to an artifact (the CLI calls it directly), and a
manager that runs them one at a time in a background thread for the admin API, with state on disk."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.settings import ServerSettings
from app.training.config import load_text
from app.training.projection import ProjectionConfig, train_projection
from app.training.soft_prompt import SoftPromptConfig, train_soft_prompt

JobConfig = ProjectionConfig | SoftPromptConfig


def upload_dir(settings: ServerSettings) -> Path:
    return settings.cache_dir / "uploads"


def run_training(runner: ModelRunner, settings: ServerSettings, config: JobConfig,
                 projections: dict[str, Projection], *, checkpoint: Path | None = None,
                 cancel: threading.Event | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run one training config to its artifact; `projections` (by id) are those a soft prompt may target."""
    text = load_text(config.data, settings.data_dir, upload_dir(settings))
    if isinstance(config, ProjectionConfig):
        return train_projection(runner, config, text, settings.projection_dir, checkpoint=checkpoint,
                                cancel=cancel, on_step=on_step)
    if config.projection_id not in projections:
        raise ValueError(f"no projection {config.projection_id!r} on this server; known: {', '.join(projections)}")
    return train_soft_prompt(runner, projections[config.projection_id], config, text, settings.soft_prompt_dir,
                             checkpoint=checkpoint, cancel=cancel, on_step=on_step)
