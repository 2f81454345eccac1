"""Choosing the next token from the last position's logits: greedy, or sampling with temperature and top-p."""

from __future__ import annotations

import torch

from app.engine.request import GenerationParams


def next_tokens(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` (rows x vocab): the argmax at temperature 0, else a draw from the softmax at
    `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p  # the mass before it already suffices
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
