"""Scoring a continuation given a prefix of embeddings: the loss soft prompts train on and every utility row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def continuation_logits(model: PreTrainedModel, prefix: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """The logits (B x C x vocab) that predict `continuation` (B x C ids) after `prefix` (B x P x b embeddings).

    Only the C positions that predict the continuation are projected to the vocabulary.
    """
    inputs = torch.cat([prefix, model.get_input_embeddings()(continuation)], dim=1)
    return model(inputs_embeds=inputs, logits_to_keep=continuation.shape[1] + 1).logits[:, :-1].float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dimension of B x C `values`, per example, over the positions `mask` keeps."""
    if mask is None:
        return values.mean(dim=1)
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


PAD = -1
"""Fills a continuation after a chat answer that ends before it does; never a token (scored positions exclude it)."""


def answer_mask(continuation: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """The positions of each continuation that are scored: up to and including its first `stop_id` (a chat answer's
    end), and never PAD. Prose continuations contain neither, so every position counts."""
    keep = continuation != PAD
    if stop_id is None:
        return keep
    stops = (continuation == stop_id).long()
    return keep & ((stops.cumsum(dim=1) - stops) == 0)


def continuation_loss(model: PreTrainedModel, prefix: torch.Tensor, continuation: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `continuation` (B x C ids) after `prefix` (B x P x b embeddings), per example,
    over the positions `mask` keeps (all by default)."""
    logits = continuation_logits(model, prefix, continuation)
    nll = F.cross_entropy(logits.transpose(1, 2), continuation, reduction="none")
    return masked_mean(nll, mask)


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a text starts from: BOS, or EOS for models without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def start_prefix(model: PreTrainedModel, token_id: int, batch: int) -> torch.Tensor:
    """The embedding of one start-of-text token per example: what 'sending nothing' scores after."""
    ids = torch.full((batch, 1), token_id, dtype=torch.long, device=model.device)
    return model.get_input_embeddings()(ids)
