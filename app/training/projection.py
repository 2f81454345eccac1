"""Training the projection (encoder b -> k, decoder k -> b) with the LLM frozen.

Starts from whitened PCA and minimises the next-token loss of segments whose prefix goes through the
projection, as a prompt does at inference, and whose continuation stays clean. With `noise_aware`
(the default) the clip and the stochastic quantizer are in the loop, at a per-segment mu drawn
log-uniformly from [mu_min, mu_max], so the projection learns codes that survive them; without it
(as the paper trains) the prefix is only projected and reconstructed.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field, model_validator

from app.model_runner import ModelRunner
from app.reconstruction import Projection, pca_projection, publish, save_projection
from app.training.config import TrainingConfig, held_out_loss, training_record, training_segments
from app.training.loop import train_loop
from app.training.mechanism import privatize
from client_sdk.mechanism import MechanismParams


class ProjectionConfig(TrainingConfig):
    dim: int = Field(72, ge=1, le=8192, description="k, the projected width")
    clip: float = Field(2.0, gt=0, le=1000, description="c, in standard deviations of the PCA start")
    noise_aware: bool = True
    bits: int = Field(4, ge=1, le=8, description="n of the quantizer in the loop")
    mu_min: float = Field(10.0, gt=0, le=1e6)
    mu_max: float = Field(50.0, gt=0, le=1e6)
    lr: float = Field(1e-3, gt=0, le=1)

    @model_validator(mode="after")
    def _mu_range(self) -> "ProjectionConfig":
        if self.mu_min > self.mu_max:
            raise ValueError("mu_min must not exceed mu_max")
        return self


def projection_loss(runner: ModelRunner, projection: Projection, config: ProjectionConfig) -> Callable:
    """(segments, generator) -> the mean next-token loss with the prefix sent through the projection."""
    model, table = runner.model, runner.input_embeddings

    def loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = batch.to(model.device)
        prefix, continuation = batch[:, : config.prefix_tokens], batch[:, config.prefix_tokens :]
        z = projection.project(table[prefix])
        if config.noise_aware:
            log_mu = torch.empty(len(batch), 1, 1).uniform_(math.log(config.mu_min), math.log(config.mu_max),
                                                            generator=generator)
            scale = torch.tensor([[[MechanismParams.from_mu(float(m), bits=config.bits, dim=config.dim,
                                                             clip=config.clip).scale]] for m in log_mu.exp().flatten()])
            z = privatize(z, config.clip, scale.to(z.device), config.bits, generator)
        inputs = torch.cat([projection.reconstruct(z), table[continuation]], dim=1)
        return model(inputs_embeds=inputs, labels=batch).loss

    return loss


def train_projection(runner: ModelRunner, config: ProjectionConfig, text: str, out_dir: Path, *,
                     checkpoint: Path | None = None, cancel: threading.Event | None = None,
                     on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train, evaluate on held-out segments, and write the artifact `out_dir/<name>`; returns its manifest."""
    runner.model.requires_grad_(False)
    table = runner.input_embeddings.detach()
    if config.dim > table.shape[1]:
        raise ValueError(f"dim {config.dim} exceeds the model width {table.shape[1]}")
    train, held = training_segments(text, runner.tokenizer, config)
    start = pca_projection(table, config.dim, config.clip)
    projection = Projection(*(t.clone().to(table.device).requires_grad_(True)
                              for t in (start.encoder, start.decoder, start.mean)), clip=config.clip)
    loss = projection_loss(runner, projection, config)
    before = held_out_loss(loss, held, config.batch_size, config.seed)
    state = train_loop({"encoder": projection.encoder, "decoder": projection.decoder, "mean": projection.mean},
                       loss, train, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                       seed=config.seed, run_key=config.model_dump_json(), checkpoint=checkpoint, cancel=cancel,
                       on_step=on_step)
    trained = Projection(*(t.detach() for t in (projection.encoder, projection.decoder, projection.mean)),
                         clip=config.clip)
    published = publish(trained, table)
    manifest = {
        "kind": "projection",
        "id": published.id,
        **training_record(runner.model_id, runner.fingerprint, config, text, train, state),
        "held_out_loss_pca": before,
        "held_out_loss": held_out_loss(projection_loss(runner, trained, config), held, config.batch_size,
                                       config.seed),
    }
    save_projection(published, out_dir / config.name, manifest)
    return manifest
