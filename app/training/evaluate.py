"""Scoring a continuation given a prefix of embeddings: the loss soft prompts train on and every utility row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def continuation_loss(model: PreTrainedModel, prefix: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `continuation` (B x C ids) after `prefix` (B x P x b embeddings), per example.

    Only the C positions that predict the continuation are projected to the vocabulary.
    """
    embed = model.get_input_embeddings()
    inputs = torch.cat([prefix, embed(continuation)], dim=1)
    logits = model(inputs_embeds=inputs, logits_to_keep=continuation.shape[1] + 1).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), continuation, reduction="none")
    return nll.mean(dim=1)


def start_prefix(model: PreTrainedModel, token_id: int, batch: int) -> torch.Tensor:
    """The embedding of one start-of-text token per example: what 'sending nothing' scores after."""
    ids = torch.full((batch, 1), token_id, dtype=torch.long, device=model.device)
    return model.get_input_embeddings()(ids)
