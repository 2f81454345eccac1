"""Projections (b -> k on the client's side, k -> b here) and the reconstruction of privatized prompts.

A projection is an artifact with an id: the first 16 hex characters of the SHA-256 of its projected
table file, the only part of it the client receives. Trained projections (see app.training.projection)
are artifacts in `projections/` that ship that table file as made when they were trained, so their id (and the
soft prompts pinned to it) is the same on every machine, whatever the local model conversion's float rounding;
the fallback, and the training's starting point, is whitened PCA of the model's input-embedding table,
published from the table here: each of the top-k principal coordinates is scaled to unit variance over the
vocabulary, so one clip c (in standard deviations) fits all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.artifacts import ArtifactError, manifests, not_served_reason, read_manifest, write_artifact
from app.model_runner import ModelRunner
from client_sdk.bundle import sha256_hex
from client_sdk.mechanism import dequantize
from client_sdk.wire import Payload


@dataclass
class Projection:
    """W_enc (k x b), W_dec (b x k) and the mean embedding: z = W_enc (e - mean), e' = mean + W_dec z."""

    encoder: torch.Tensor
    decoder: torch.Tensor
    mean: torch.Tensor
    clip: float

    @property
    def dim(self) -> int:
        return int(self.encoder.shape[0])

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(n x b) embeddings -> (n x k) projected coordinates (before clipping)."""
        return (embeddings - self.mean) @ self.encoder.T

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """(n x k) coordinates -> (n x b) embeddings."""
        return self.mean + z @ self.decoder.T

    def table_file(self, embedding_table: torch.Tensor) -> bytes:
        """The client's projected table, pre-clipped to [-c, c] and stored as int8 with scale c/127."""
        with torch.no_grad():
            z = self.project(embedding_table.float()).clamp(-self.clip, self.clip).numpy()
        scale = np.full(self.dim, self.clip / 127.0, dtype=np.float32)
        table = np.round(z / scale).astype(np.int8)
        return save({"table": table, "scale": scale})


def pca_projection(embedding_table: torch.Tensor, dim: int, clip: float) -> Projection:
    """Whitened PCA of the embedding table: the top-`dim` principal directions, each scaled to unit variance."""
    e = embedding_table.detach().double()
    if not 1 <= dim <= e.shape[1]:
        raise ValueError(f"projection dim must be in 1..{e.shape[1]}, got {dim}")
    mean = e.mean(dim=0)
    centered = e - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centered.T @ centered / (e.shape[0] - 1))
    top = torch.argsort(eigenvalues, descending=True)[:dim]
    std = eigenvalues[top].clamp_min(1e-12).sqrt()
    directions = eigenvectors[:, top]  # b x k, orthonormal columns
    return Projection(encoder=(directions / std).T.float().contiguous(),
                      decoder=(directions * std).float().contiguous(), mean=mean.float(), clip=clip)


@dataclass
class PublishedProjection:
    """A projection with its client table file and id."""

    projection: Projection
    table_bytes: bytes

    @property
    def id(self) -> str:
        return sha256_hex(self.table_bytes)[:16]


def publish(projection: Projection, embedding_table: torch.Tensor) -> PublishedProjection:
    return PublishedProjection(projection, projection.table_file(embedding_table))


def reconstruct_payload(payload: Payload, projection: Projection, embedding_table: torch.Tensor) -> torch.Tensor:
    """(T x b) embeddings in prompt order: private spans dequantized (A(2K/u - 1)) and decoded through the
    projection, public spans looked up in the model's own embedding table."""
    pieces = []
    with torch.no_grad():
        for span, data in payload.segments():
            if span.private:
                pieces.append(projection.reconstruct(torch.from_numpy(dequantize(data, payload.params))))
            else:
                ids = torch.from_numpy(data).to(embedding_table.device)
                pieces.append(embedding_table[ids].to(device=projection.mean.device, dtype=projection.mean.dtype))
    return torch.cat(pieces)


PROJECTION_FILE = "projection.safetensors"
TABLE_FILE = "table.safetensors"


def save_projection(published: PublishedProjection, directory: Path, manifest: dict) -> None:
    """Write a projection artifact: encoder, decoder and mean as safetensors, the client's table file as published,
    and its manifest (with the table's id)."""
    projection = published.projection
    tensors = {"encoder": projection.encoder, "decoder": projection.decoder, "mean": projection.mean}
    data = save_tensors({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()})
    write_artifact(directory, {PROJECTION_FILE: data, TABLE_FILE: published.table_bytes},
                   {**manifest, "id": published.id, "dim": projection.dim, "clip": projection.clip})


def load_projection(directory: Path) -> PublishedProjection:
    """A projection artifact with its shipped table file (ArtifactError if the table is missing or is not the one
    the manifest's id names)."""
    manifest = read_manifest(directory)
    if not (directory / TABLE_FILE).exists():
        raise ArtifactError(f"{directory.name}: no client table ({TABLE_FILE}); train the projection again")
    tensors = load_tensors((directory / PROJECTION_FILE).read_bytes())
    published = PublishedProjection(Projection(encoder=tensors["encoder"], decoder=tensors["decoder"],
                                               mean=tensors["mean"], clip=float(manifest["clip"])),
                                    (directory / TABLE_FILE).read_bytes())
    if published.id != manifest.get("id"):
        raise ArtifactError(f"{directory.name}: its table's id is {published.id}, its manifest says {manifest.get('id')}")
    return published


def load_projections(root: Path, runner: ModelRunner, *,
                     active_only: bool = True) -> tuple[list[PublishedProjection], dict[str, str]]:
    """The projections under `root` trained for the runner's model (by name and content fingerprint) and width,
    only the active ones by default; and, by name, why each other one is not loaded."""
    loaded, skipped, hidden_size = [], {}, runner.input_embeddings.shape[1]
    for name, manifest in manifests(root).items():
        reason = not_served_reason(manifest, runner.model_id, runner.fingerprint, active_only=active_only)
        if reason is None:
            try:
                published = load_projection(root / name)
            except ArtifactError as err:
                reason = str(err).removeprefix(f"{name}: ")
            else:
                if published.projection.encoder.shape[1] == hidden_size:
                    loaded.append(published)
                    continue
                reason = f"it projects from width {published.projection.encoder.shape[1]}, the model's is {hidden_size}"
        skipped[name] = reason
    return loaded, skipped
