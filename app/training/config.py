"""What every training run is told: its data, its segment shape and its optimisation budget."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from app.artifacts import NAME
from app.training.data import (CORPORA, DataError, parse_upload, read_corpus, split_held_out, text_sha256,
                               token_segments)
from app.training.loop import LoopState

UPLOAD = re.compile(r"^upload:([0-9a-f]{64})$")


class TrainingConfig(BaseModel):
    """Fields shared by projection and soft-prompt training."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME.pattern, description="artifact name (a folder name)")
    data: str = Field("wikitext-2-valid", description=f"a corpus ({', '.join(CORPORA)}) or upload:<sha256>")
    steps: int = Field(150, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=256)
    prefix_tokens: int = Field(64, ge=1, le=1024, description="tokens sent privately (the prompt part)")
    continuation_tokens: int = Field(64, ge=1, le=1024, description="clean tokens after it (the answer part)")
    held_out_segments: int = Field(16, ge=1, le=10_000)
    seed: int = Field(0, ge=0, lt=2**31)


def load_text(data: str, data_dir: Path, upload_dir: Path) -> str:
    """The text behind `data`: a named corpus under `data_dir` or an uploaded file under `upload_dir`."""
    match = UPLOAD.match(data)
    if match is None:
        return read_corpus(data, data_dir)
    path = upload_dir / f"{match.group(1)}.txt"
    if not path.exists():
        raise DataError(f"no uploaded dataset {match.group(1)}")
    return parse_upload(path.read_bytes())


def training_segments(text: str, tokenizer, config: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) segments of prefix + continuation tokens; at most `held_out_segments` held out."""
    segments = token_segments(text, tokenizer, config.prefix_tokens + config.continuation_tokens)
    train, held = split_held_out(segments)
    return train, held[: config.held_out_segments]


def held_out_loss(loss_fn, held: torch.Tensor, batch_size: int, seed: int) -> float:
    """Mean of `loss_fn` over the held-out segments, with fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(held), batch_size):
            batch = held[start : start + batch_size]
            total += float(loss_fn(batch, generator)) * len(batch)
    return total / len(held)


def training_record(model_id: str, fingerprint: str, config: TrainingConfig, text: str, train: torch.Tensor,
                    state: LoopState) -> dict:
    """The manifest fields every trained artifact records: what it is for (the model's name and content
    fingerprint), what it saw, how training went."""
    return {
        "model_id": model_id,
        "base_model_sha256": fingerprint,
        "active": False,
        "config": config.model_dump(),
        "data_sha256": text_sha256(text),
        "train_segments": len(train),
        "steps": state.step,
        "loss_curve": state.losses,
    }
