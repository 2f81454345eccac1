"""The optimisation loop both trainers share: Adam over a few tensors, checkpoints, resume, cancellation.

Every step's batch and noise come from a generator seeded by (seed, step), so a run resumed from a
checkpoint takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from app.files import write_bytes_atomic

LossFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""(batch of token segments, this step's generator) -> scalar loss."""


class Cancelled(Exception):
    """The run was cancelled; its last checkpoint is kept, so it can be resumed."""


class CheckpointMismatch(ValueError):
    """A checkpoint exists but belongs to a run with a different configuration."""


@dataclass
class LoopState:
    step: int = 0
    losses: list[float | None] = field(default_factory=list)  # None: a step with no examples (DP-SGD)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_loop(
    params: dict[str, torch.Tensor],
    loss_fn: LossFn,
    segments: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lrs: dict[str, float] | None = None,
    seed: int,
    run_key: str,
    checkpoint: Path | None = None,
    checkpoint_every: int = 10,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LoopState:
    """Minimise `loss_fn` over random batches of `segments`, updating `params` in place.

    With `checkpoint`, progress is saved every `checkpoint_every` steps (atomically) and a run with the
    same `run_key` resumes from it. `on_step(step, loss)` is called after each step. `lrs` gives some of
    `params` (by name) their own learning rate; the others take `lr`.
    """
    # one parameter group unless some rates differ, so checkpoints of single-rate runs keep their layout
    groups = ([{"params": [value], "lr": lrs.get(name, lr)} for name, value in params.items()] if lrs
              else list(params.values()))
    optimizer = torch.optim.Adam(groups, lr=lr)
    state = LoopState()
    if checkpoint is not None and checkpoint.exists():
        state = _restore(checkpoint, run_key, params, optimizer)
    for step in range(state.step, steps):
        if cancel is not None and cancel.is_set():
            if checkpoint is not None:
                _save(checkpoint, run_key, params, optimizer, state)
            raise Cancelled(f"cancelled at step {step} of {steps}")
        generator = step_generator(seed, step)
        batch = segments[torch.randint(len(segments), (batch_size,), generator=generator)]
        loss = loss_fn(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step, value = step + 1, float(loss.detach())
        state.losses.append(value)
        if checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == steps):
            _save(checkpoint, run_key, params, optimizer, state)
        if on_step is not None:
            on_step(state.step, value)
    return state


def _save(path: Path, run_key: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
          state: LoopState) -> None:
    buffer = io.BytesIO()
    torch.save({"run_key": run_key, "step": state.step, "losses": state.losses,
                "params": {k: v.detach() for k, v in params.items()}, "optimizer": optimizer.state_dict()}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _restore(path: Path, run_key: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> LoopState:
    saved = torch.load(path, weights_only=True)
    if saved["run_key"] != run_key:
        raise CheckpointMismatch(f"{path} belongs to a different run; delete it or use another checkpoint path")
    with torch.no_grad():
        for name, value in params.items():
            value.copy_(saved["params"][name])
    optimizer.load_state_dict(saved["optimizer"])
    return LoopState(step=saved["step"], losses=list(saved["losses"]))
