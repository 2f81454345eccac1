"""Training a soft prompt on a tenant's own examples with DP-SGD (Opacus), so the prompt does not leak any one example.

The setting is the soft-prompt trainer's (frozen LLM and projection, privatized prefix, clean continuation, loss on
the continuation), with DP-SGD on top: Poisson sampling of examples (one example = one token segment), each
example's gradient clipped to `max_grad_norm`, Gaussian noise added once per logical batch, the noise multiplier
chosen by Opacus's `make_private_with_epsilon` for the target (epsilon, delta) over the planned steps. Memory stays
small because the logical batch runs as micro-batches of `physical_batch_size` (Opacus's BatchMemoryManager).

Only the soft prompt is trained (m x b parameters: 18,432 for SmolLM2 at m = 32); the LLM's blocks stay frozen
(training some of them would need a per-tenant copy of those blocks at serving time). The guarantee protects each *example* from whoever receives the trained prompt; the server that trains it
sees the data, and the job's loss curve (shown to the operator) is not private.
"""

from __future__ import annotations

import math
import secrets
import threading
import warnings
from pathlib import Path
from typing import Callable, Literal

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.soft_prompts import save_soft_prompt
from app.training.config import training_segments
from app.training.evaluate import continuation_loss
from app.training.loop import Cancelled, LoopState
from app.training.soft_prompt import SoftPromptConfig, init_from_text, privatized_prefix, soft_prompt_manifest

TENANT = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class DPSoftPromptConfig(SoftPromptConfig):
    """A soft prompt trained with DP-SGD; `steps` are logical steps of expected size `batch_size`."""

    tenant: str = Field(pattern=TENANT, description="whose data it is: their training budget is charged")
    target_epsilon: float = Field(gt=0, le=100)
    delta: float | None = Field(None, gt=0, lt=1, description="default: min(1e-5, 1/n) for n training examples")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clip")
    physical_batch_size: int = Field(2, ge=1, le=256, description="micro-batch size (memory); noise is per logical batch")
    accountant: Literal["prv", "rdp"] = "prv"
    secure_rng: bool = Field(True, description="noise and sampling seeded from the OS (False: from `seed`, for tests)")
    steps: int = Field(30, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _next_token_on_the_tenant_text(self) -> "DPSoftPromptConfig":
        if self.objective != "next_token" or self.chat_examples:
            raise ValueError("DP-SGD trains with the next-token objective on the tenant's text only")
        return self

    @model_validator(mode="after")
    def _physical_within_logical(self) -> "DPSoftPromptConfig":
        if self.physical_batch_size > self.batch_size:
            raise ValueError("physical_batch_size must not exceed batch_size")
        return self


class PromptLayer(nn.Module):
    """Prepends the soft prompt to each example's embeddings; Opacus gets its per-example gradient exactly."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings)

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embeddings.expand(len(received), -1, -1), received], dim=1)


@register_grad_sampler(PromptLayer)
def _prompt_grad_sample(layer: PromptLayer, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Example i's gradient of the prompt is the gradient at its first m output positions."""
    return {layer.embeddings: backprops[:, : layer.embeddings.shape[0]]}


class PromptedModel(nn.Module):
    """[soft prompt, received prefix] -> frozen LLM -> per-example continuation loss."""

    def __init__(self, model: nn.Module, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.prompt = PromptLayer(embeddings)
        self.model = model

    def forward(self, received: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        return continuation_loss(self.model, self.prompt(received), continuation)


def accounted_steps(engine: PrivacyEngine) -> int:
    """Logical steps the accountant has charged (noise added each time)."""
    return sum(steps for _, _, steps in engine.accountant.history)


def no_examples(optimizer: DPOptimizer) -> None:
    """Give every parameter an empty per-example gradient, for a logical batch that Poisson sampling left empty.

    Opacus then takes the step as DP-SGD defines it: the clipped sum over no examples is zero, so the update is
    Gaussian noise alone (scaled by the expected batch size), and the accountant charges the step. Skipping the
    update instead would publish whether the batch was empty, which depends on who is in the data and is not part of
    the mechanism the accountant charges for; without this, Opacus raises "Per sample gradient is not initialized".
    """
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))


def default_delta(examples: int) -> float:
    return min(1e-5, 1 / examples)


def exact_epochs(steps: int, sample_rate: float) -> float:
    """Epochs for which Opacus plans exactly `steps` steps (it takes int(epochs / sample_rate))."""
    epochs = steps * sample_rate
    while int(epochs / sample_rate) < steps:
        epochs = math.nextafter(epochs, math.inf)
    return epochs


def train_dp_soft_prompt(runner: ModelRunner, projection: Projection, config: DPSoftPromptConfig, text: str,
                         out_dir: Path, *, cancel: threading.Event | None = None,
                         on_step: Callable[[int, float | None], None] | None = None) -> dict:
    """Train with DP-SGD, evaluate on held-out segments, write `out_dir/<name>`; returns the manifest.

    The manifest's `dp` block records epsilon (as Opacus's accountant reports it after training), delta, the noise
    multiplier, the clip norm, the sampling rate and the steps.
    """
    model = runner.model.requires_grad_(False)
    train, held = training_segments(text, runner.tokenizer, config)
    delta = config.delta or default_delta(len(train))
    sampling, noise = (torch.Generator().manual_seed(secrets.randbits(63) if config.secure_rng else config.seed + i)
                       for i in range(2))
    wrapped = PromptedModel(model, init_from_text(runner, config.init_text, config.virtual_tokens))
    optimizer = torch.optim.Adam(wrapped.prompt.parameters(), lr=config.lr)
    # Poisson sampling: each example joins each logical batch independently with rate batch_size / n.
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(train), batch_size=config.batch_size),
                                           generator=sampling)
    engine = PrivacyEngine(accountant=config.accountant)
    private, optimizer, loader = engine.make_private_with_epsilon(
        module=wrapped, optimizer=optimizer, data_loader=loader, target_epsilon=config.target_epsilon,
        target_delta=delta, epochs=exact_epochs(config.steps, 1 / len(loader)), max_grad_norm=config.max_grad_norm,
        poisson_sampling=False, noise_generator=noise)
    received_prefix = privatized_prefix(runner, projection, config.bits, config.mu)
    mechanism_noise = torch.Generator().manual_seed(config.seed)
    state, batch_losses = LoopState(), []
    with warnings.catch_warnings():
        # Opacus's hooks fire on module outputs: the inputs (privatized prefixes) need no gradient, by design.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        while state.step < config.steps:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=config.physical_batch_size,
                                    optimizer=optimizer) as micro_batches:
                for (batch,) in micro_batches:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"cancelled at step {state.step} of {config.steps}")
                    optimizer.zero_grad(set_to_none=True)
                    if len(batch):
                        prefix, continuation = batch[:, : config.prefix_tokens], batch[:, config.prefix_tokens :]
                        loss = private(received_prefix(prefix, mechanism_noise), continuation.to(model.device))
                        loss.mean().backward()  # Opacus undoes the mean (loss_reduction="mean")
                        batch_losses.extend(loss.detach().tolist())
                    else:
                        no_examples(optimizer)
                    optimizer.step()
                    if accounted_steps(engine) > state.step:  # a logical step: noise added, accountant charged
                        state.step += 1
                        state.losses.append(sum(batch_losses) / len(batch_losses) if batch_losses else None)
                        batch_losses.clear()
                        if on_step is not None:
                            on_step(state.step, state.losses[-1])
                        if state.step == config.steps:
                            break
    prompt = wrapped.prompt.embeddings.detach()
    manifest = {
        **soft_prompt_manifest(runner, projection, config, prompt, text, train, held, state),
        "dp": {
            "tenant": config.tenant,
            "epsilon": engine.get_epsilon(delta),
            "delta": delta,
            "target_epsilon": config.target_epsilon,
            "noise_multiplier": optimizer.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "sample_rate": 1 / len(loader),
            "steps": state.step,
            "accountant": config.accountant,
            "secure_rng": config.secure_rng,
            "trained_parameters": prompt.numel(),
        },
    }
    save_soft_prompt(prompt, out_dir / config.name, manifest, runner)
    return manifest
