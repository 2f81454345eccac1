"""What the utility benchmarks share: the fixed WikiText-2 test sample, the client's and server's path, scoring.

A sample is evenly spaced 64-token prefix + 64-token continuation segments. The prefix goes through the client's
real path (its int8 projected table, the clip, the stochastic quantizer) and the server's (dequantization, decoder);
the continuation is scored, or compared with what the model generates, after it.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.training.data import evenly_spaced, read_corpus, token_segments
from app.training.evaluate import continuation_loss
from client_sdk.mechanism import MechanismParams, dequantize, quantize, secure_rng

PREFIX, CONTINUATION = 64, 64


def load_sample(runner: ModelRunner, data_dir, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix ids B x 64, continuation ids B x 64) from WikiText-2 test, the same for a given `segments`."""
    tokens = token_segments(read_corpus("wikitext-2-test", data_dir), runner.tokenizer, PREFIX + CONTINUATION)
    sample = evenly_spaced(tokens, segments)
    return sample[:, :PREFIX], sample[:, PREFIX:]


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a text starts from: BOS, or EOS for models without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def mean_nll(model, prefixes: torch.Tensor, continuations: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token NLL of the continuations after the prefixes (B x P x b embeddings)."""
    with torch.inference_mode():
        losses = [continuation_loss(model, prefixes[i : i + batch], continuations[i : i + batch])
                  for i in range(0, len(continuations), batch)]
    return float(torch.cat(losses).mean())


def send(projected: np.ndarray, prefix_ids: torch.Tensor, params: MechanismParams, seed: int) -> np.ndarray:
    """The levels the client sends for these prefixes (B x P x k), from its table as it loads it."""
    return quantize(projected[prefix_ids.numpy()], params, secure_rng(seed))


def reconstruct(projection: Projection, levels: np.ndarray, params: MechanismParams) -> torch.Tensor:
    """What the server rebuilds from the levels (B x P x b)."""
    return projection.reconstruct(torch.from_numpy(dequantize(levels, params)))
