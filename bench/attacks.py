"""What an honest-but-curious server can recover from payloads: token-recovery attacks on the DEL mechanism.

- `nearest_neighbour`: the paper's embedding-inversion attack. Rebuild the embedding as the server does and
  take the vocabulary token whose input embedding is closest.
- `maximum_likelihood`: the stronger attack. The server knows the mechanism and the client's projected table, so
  it can score every token v by the exact likelihood of the received levels, sum_j log Binom(K_j; u, p_j(v)) with
  p_j(v) = (A + t_vj) / 2A, optionally plus a log prior over tokens.
- `language_model_attack`: the same likelihood plus a language model's prior, decoded greedily left to right
  (each guess conditions the prior for the next).

Each returns one guessed token id per received token; `recovery_rate` is the fraction guessed exactly, and
`calibrate_mu` finds the mu at which an attack reaches a target rate, as the paper calibrates its mechanism.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from client_sdk.mechanism import MechanismParams

CHUNK = 256


def nearest_neighbour(received: np.ndarray, embedding_table: np.ndarray) -> np.ndarray:
    """argmin_v ||e' - E_v|| for each received embedding e' (T x b) against the table E (V x b)."""
    table = np.asarray(embedding_table, dtype=np.float32)
    norms = (table**2).sum(axis=1)
    guesses = [np.argmin(norms[None] - 2 * np.asarray(chunk, dtype=np.float32) @ table.T, axis=1)
               for chunk in np.array_split(received, max(1, -(-len(received) // CHUNK)))]
    return np.concatenate(guesses)


def likelihood_terms(client_table: np.ndarray, params: MechanismParams) -> tuple[np.ndarray, np.ndarray]:
    """(k x V) weights and (V,) offsets with log P(levels | v) = levels @ weights + offsets, up to a constant.

    For one coordinate, K log p + (u - K) log(1 - p) = K log(p / (1 - p)) + u log(1 - p); the binomial
    coefficients do not depend on v and are left out.
    """
    v = np.clip(np.asarray(client_table, dtype=np.float64), -params.clip, params.clip)
    p = (params.scale + v) / (2 * params.scale)  # strictly inside (0, 1) because A > c
    log_q = np.log1p(-p)
    return (np.log(p) - log_q).T, params.levels * log_q.sum(axis=1)


def log_likelihoods(levels: np.ndarray, terms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """log P(levels | token v) for every token: (T x k) levels -> (T x V), from `likelihood_terms`."""
    weights, offsets = terms
    return np.asarray(levels, dtype=np.float64) @ weights + offsets


def maximum_likelihood(levels: np.ndarray, client_table: np.ndarray, params: MechanismParams,
                       log_prior: np.ndarray | None = None) -> np.ndarray:
    """argmax_v log P(levels | v) (+ log prior(v)) for each received token (T x k levels)."""
    terms = likelihood_terms(client_table, params)
    guesses = []
    for start in range(0, len(levels), CHUNK):
        scores = log_likelihoods(levels[start : start + CHUNK], terms)
        if log_prior is not None:
            scores = scores + log_prior[start : start + CHUNK]
        guesses.append(np.argmax(scores, axis=1))
    return np.concatenate(guesses)


def language_model_attack(levels: np.ndarray, client_table: np.ndarray, params: MechanismParams,
                          model: torch.nn.Module, start_id: int, *, prior_only: bool = False) -> np.ndarray:
    """Greedy MAP decoding of whole prompts (B x T x k levels -> B x T ids) with the model's prior over the next token.

    `prior_only` ignores the levels: what the attack guesses with no payload at all, its floor.
    """
    terms = likelihood_terms(client_table, params)
    ids = torch.full((levels.shape[0], 1), start_id, dtype=torch.long)
    past, guesses = None, []
    with torch.inference_mode():
        for t in range(levels.shape[1]):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            scores = torch.log_softmax(out.logits[:, -1].double(), dim=-1).numpy()
            if not prior_only:
                scores = scores + log_likelihoods(levels[:, t], terms)
            ids = torch.from_numpy(np.argmax(scores, axis=1))[:, None]
            guesses.append(ids[:, 0].numpy())
    return np.stack(guesses, axis=1)


def recovery_rate(guesses: np.ndarray, truth: np.ndarray) -> float:
    """The attack success rate: the fraction of tokens recovered exactly."""
    return float(np.mean(np.asarray(guesses) == np.asarray(truth)))


def calibrate_mu(success_at: Callable[[float], float], target: float, low: float, high: float,
                 steps: int) -> dict[str, float | None]:
    """Bisect log(mu) in [low, high] for the smallest mu whose attack success reaches `target`.

    Assumes success grows with mu (less noise). Returns the bracket found, the success at its upper end, and
    mu=None if even `high` stays below the target (or mu=low if `low` already reaches it).
    """
    at_high = success_at(high)
    if at_high < target:
        return {"mu": None, "low": high, "high": None, "success": at_high}
    at_low = success_at(low)
    if at_low >= target:
        return {"mu": low, "low": None, "high": low, "success": at_low}
    success = at_high
    for _ in range(steps):
        middle = math.sqrt(low * high)
        rate = success_at(middle)
        if rate >= target:
            high, success = middle, rate
        else:
            low = middle
    return {"mu": high, "low": low, "high": high, "success": success}
