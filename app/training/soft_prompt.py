"""Training a soft prompt for one mechanism setting (projection, n, mu), with the LLM and projection frozen.

m virtual tokens, initialised from the embeddings of a text, are prepended to the prefix exactly as at
inference: the prefix goes through the projection, the clip and the stochastic quantizer (fresh noise
each step), the continuation stays clean, and the loss is on the continuation only: next-token loss on the
text (`objective="next_token"`), or KL from the clean model given the clean prefix (`"distill"`, see
distill.py). With `chat_examples`, chat examples synthesized from the same text join the prose (synth.py).
After training, jobs.py checks the prompt on a text it never saw (`floor_data`, Emma by default) against
sending nothing (floor.py); the result goes into the manifest, and a prompt that fails is never activated.
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from typing import Literal

from pydantic import Field, model_validator

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.soft_prompts import save_soft_prompt
from app.training.config import TrainingConfig, held_out_loss, training_record, training_segments
from app.training.data import HELD_OUT_NOVEL, CORPORA
from app.training.distill import distillation_kl
from app.training.evaluate import answer_mask, continuation_loss
from app.training.loop import LoopState, train_loop
from app.training.mechanism import privatize
from client_sdk.mechanism import MechanismParams

DEFAULT_INIT_TEXT = ("The text below arrived through a noisy private channel. Read past the noise, "
                     "infer what it says, and continue it naturally in the same style.")


class SoftPromptConfig(TrainingConfig):
    projection_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="the projection the client uses")
    bits: int = Field(4, ge=1, le=8)
    mu: float = Field(gt=0, le=1e6, description="per-token CLT mu of the client's mechanism")
    virtual_tokens: int = Field(32, ge=1, le=512, description="m, the soft prompt's length")
    init_text: str = Field(DEFAULT_INIT_TEXT, min_length=1, max_length=10_000)
    lr: float = Field(1e-2, gt=0, le=1)
    objective: Literal["next_token", "distill"] = Field(
        "next_token", description="next-token loss on the text, or KL from the clean model given the clean prefix")
    chat_examples: int = Field(0, ge=0, le=2000,
                               description="chat examples to synthesize from the text (0: prose only)")
    floor_data: str | None = Field(HELD_OUT_NOVEL, description="held-out corpus the prompt must not be worse than "
                                                               "sending nothing on (None: skip the check)")
    floor_segments: int = Field(32, ge=2, le=10_000)

    @model_validator(mode="after")
    def _floor_text_is_held_out(self) -> "SoftPromptConfig":
        if self.floor_data is not None and self.floor_data in CORPORA and self.data in CORPORA and \
                set(CORPORA[self.floor_data]) & set(CORPORA[self.data]):
            raise ValueError(f"training data {self.data!r} contains the held-out text {self.floor_data!r}")
        return self


def init_from_text(runner: ModelRunner, text: str, length: int) -> torch.Tensor:
    """The embeddings of `text`'s tokens, repeated or cut to `length` rows."""
    ids = runner.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (length // len(ids) + 1))[:length]
    return runner.input_embeddings[torch.tensor(ids)].detach().clone()


def privatized_prefix(runner: ModelRunner, projection: Projection, bits: int, mu: float) -> Callable:
    """(prefix ids, generator) -> what the server rebuilds after the client's mechanism (no gradient)."""
    table = runner.input_embeddings
    scale = MechanismParams.from_mu(mu, bits=bits, dim=projection.dim, clip=projection.clip).scale

    def received(prefix: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            z = privatize(projection.project(table[prefix.to(table.device)]), projection.clip, scale, bits, generator)
            return projection.reconstruct(z)

    return received


def private_prefix_loss(runner: ModelRunner, projection: Projection, config: SoftPromptConfig,
                        soft_prompt: torch.Tensor | None, objective: str = "next_token",
                        teacher_context: Callable[[], AbstractContextManager] = nullcontext) -> Callable:
    """(segments, generator) -> mean continuation loss after [soft prompt, privatized prefix]: next-token
    cross-entropy, or with `objective="distill"` KL from the clean model given the clean prefix (its pass runs
    inside `teacher_context()`, see distillation_kl).

    A continuation is scored up to its first end-of-turn token (chat answers are padded with it; prose has none).
    """
    received_prefix = privatized_prefix(runner, projection, config.bits, config.mu)
    stop_id = runner.tokenizer.eos_token_id

    def loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = batch.to(runner.model.device)
        prefix, continuation = batch[:, : config.prefix_tokens], batch[:, config.prefix_tokens :]
        received = received_prefix(prefix, generator)
        if soft_prompt is not None:
            received = torch.cat([soft_prompt.expand(len(batch), -1, -1), received], dim=1)
        mask = answer_mask(continuation, stop_id)
        continuation = continuation.clamp(min=0)  # PAD positions are after the answer and not scored
        if objective == "distill":
            clean = runner.input_embeddings[prefix]
            return distillation_kl(runner.model, clean, received, continuation, mask, teacher_context).mean()
        return continuation_loss(runner.model, received, continuation, mask).mean()

    return loss


def soft_prompt_manifest(runner: ModelRunner, projection: Projection, config: SoftPromptConfig, prompt: torch.Tensor,
                         text: str, train: torch.Tensor, held: torch.Tensor, state: LoopState) -> dict:
    """A trained soft prompt's manifest: its mechanism setting, how it was trained, and its held-out loss with
    and without it."""
    def held_out(soft_prompt: torch.Tensor | None) -> float:
        return held_out_loss(private_prefix_loss(runner, projection, config, soft_prompt), held, config.batch_size,
                             config.seed)

    return {"kind": "soft_prompt", "projection_id": config.projection_id, "bits": config.bits, "mu": config.mu,
            "objective": config.objective, **training_record(runner.model_id, runner.fingerprint, config, text, train, state),
            "held_out_loss": held_out(prompt), "held_out_loss_without_prompt": held_out(None)}


def train_soft_prompt(runner: ModelRunner, projection: Projection, config: SoftPromptConfig, text: str,
                      out_dir: Path, *, chat: torch.Tensor | None = None,
                      checkpoint: Path | None = None, cancel: threading.Event | None = None,
                      on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train, evaluate on held-out segments (with and without the prompt), write `out_dir/<name>`; returns the manifest.

    `chat` (examples shaped like the segments, see synth.py) joins the prose: a quarter of the pool at least.
    """
    runner.model.requires_grad_(False)
    train, held = training_segments(text, runner.tokenizer, config)
    pool = training_pool(train, chat)
    soft_prompt = init_from_text(runner, config.init_text, config.virtual_tokens).requires_grad_(True)
    loss = private_prefix_loss(runner, projection, config, soft_prompt, config.objective)
    state = train_loop({"prompt_embeddings": soft_prompt}, loss, pool, steps=config.steps,
                       batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                       run_key=config.model_dump_json(), checkpoint=checkpoint, cancel=cancel, on_step=on_step)
    manifest = soft_prompt_manifest(runner, projection, config, soft_prompt.detach(), text, train, held, state)
    if chat is not None:
        manifest["chat_examples"] = len(chat)
    save_soft_prompt(soft_prompt.detach(), out_dir / config.name, manifest, runner)
    return manifest


def training_pool(prose: torch.Tensor, chat: torch.Tensor | None) -> torch.Tensor:
    """The segments a soft prompt trains on: the prose, and `chat` mixed in if there is any (see mix)."""
    return prose if chat is None or len(chat) == 0 else mix(prose, chat)


def mix(prose: torch.Tensor, chat: torch.Tensor, chat_share: float = 0.25) -> torch.Tensor:
    """Prose and chat segments in one pool, chat repeated so that it is at least `chat_share` of it."""
    repeats = max(1, math.ceil(chat_share * len(prose) / ((1 - chat_share) * len(chat))))
    return torch.cat([prose, chat.repeat(repeats, 1)])
