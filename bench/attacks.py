"""What an honest-but-curious server can recover from payloads: token-recovery attacks, weakest to strongest.

- `nearest_neighbour`: the paper's embedding-inversion attack. Rebuild the embedding as the server does and take the
  vocabulary token whose input embedding is closest.
- `maximum_likelihood`: the server knows the mechanism and the client's projected table, so it scores every token
  v by the exact likelihood of the received levels, sum_j log Binom(K_j; u, p_j(v)) with p_j(v) = (A + t_vj) / 2A.
  With `log_prior` (a unigram prior estimated from public text, `unigram_log_prior`) it is the MAP guess per token.
- `beam_search`: MAP decoding of whole prompts, scoring likelihood plus a language model's log-prior of the sequence,
  with a beam of hypotheses per prompt (beam 1 is greedy). Tokens the server already knows (public spans) are forced.

`recovery` is the share of tokens guessed exactly, overall and on subsets (content words, private spans), with
bootstrap standard errors over prompts; `calibrate_mu` finds the mu at which an attack reaches a target rate.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from bench.bootstrap import bootstrap_se
from client_sdk.mechanism import MechanismParams

CHUNK = 256
StepScores = Callable[[int], np.ndarray]
"""Position t -> (B x V) log-likelihood of what was received at t, for each prompt and candidate token."""


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


def gaussian_log_likelihoods(received: np.ndarray, clipped_table: np.ndarray, sigma: float) -> np.ndarray:
    """log N(e' ; E_v, sigma^2 I) for every token, up to a constant: (T x b) -> (T x V)."""
    table = np.asarray(clipped_table, dtype=np.float64)
    return (np.asarray(received, dtype=np.float64) @ table.T - 0.5 * (table**2).sum(axis=1)) / sigma**2


def map_tokens(log_likelihood: Callable[[slice], np.ndarray], count: int,
               log_prior: np.ndarray | None = None) -> np.ndarray:
    """argmax_v log-likelihood (+ log prior) for each of `count` received tokens, a chunk at a time. The prior is
    (V,) for all tokens or (count x V) per token."""
    guesses = []
    for start in range(0, count, CHUNK):
        chunk = slice(start, min(start + CHUNK, count))
        scores = log_likelihood(chunk)
        if log_prior is not None:
            scores = scores + (log_prior[chunk] if log_prior.ndim == 2 else log_prior)
        guesses.append(np.argmax(scores, axis=1))
    return np.concatenate(guesses)


def maximum_likelihood(levels: np.ndarray, client_table: np.ndarray, params: MechanismParams,
                       log_prior: np.ndarray | None = None) -> np.ndarray:
    """argmax_v log P(levels | v) (+ log prior(v)) for each received token (T x k levels)."""
    terms = likelihood_terms(client_table, params)
    return map_tokens(lambda chunk: log_likelihoods(levels[chunk], terms), len(levels), log_prior)


def unigram_log_prior(token_ids: np.ndarray, vocab: int, pseudo_count: float = 0.5) -> np.ndarray:
    """log P(v) from token counts of public text, add-`pseudo_count` smoothed so no token is impossible."""
    counts = np.bincount(np.asarray(token_ids).ravel(), minlength=vocab)[:vocab] + pseudo_count
    return np.log(counts / counts.sum())


def most_frequent(token_ids: np.ndarray, count: int = 100) -> np.ndarray:
    """The `count` most frequent token ids (the function words recovery on content words leaves out)."""
    counts = np.bincount(np.asarray(token_ids).ravel())
    return np.argsort(-counts, kind="stable")[:count]


def forcing_known(step_scores: StepScores, known_ids: np.ndarray, private: np.ndarray) -> StepScores:
    """Scores where public positions (private False) are known: their true token scores 0, every other -inf."""

    def scores(t: int) -> np.ndarray:
        out = step_scores(t)
        public = ~private[:, t]
        if public.any():
            out = out.copy()
            out[public] = -np.inf
            out[public, known_ids[public, t]] = 0.0
        return out

    return scores


def beam_search(step_scores: StepScores, batch: int, steps: int, model: torch.nn.Module, start_id: int,
                beam: int) -> np.ndarray:
    """MAP decoding of `batch` prompts of `steps` tokens: maximise sum_t [log P_LM(x_t | x_<t) + step_scores(t)[x_t]]
    over a beam of `beam` hypotheses per prompt (the language model conditions on each hypothesis's own past).
    Returns the best hypothesis per prompt (B x T ids). beam=1 is greedy decoding."""
    rows = np.arange(batch)[:, None]
    total = np.full((batch, beam), -np.inf)
    total[:, 0] = 0.0  # one live hypothesis at the start, so the first step does not pick duplicates
    history = np.zeros((batch, beam, 0), dtype=np.int64)
    ids = torch.full((batch * beam, 1), start_id, dtype=torch.long)
    past = None
    with torch.inference_mode():
        for t in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            prior = torch.log_softmax(out.logits[:, -1].double(), dim=-1).numpy()
            vocab = prior.shape[-1]
            scores = (total[:, :, None] + prior.reshape(batch, beam, vocab) + step_scores(t)[:, None, :])
            flat = scores.reshape(batch, beam * vocab)
            top = np.argpartition(-flat, beam - 1, axis=1)[:, :beam] if beam < flat.shape[1] else \
                np.tile(np.arange(flat.shape[1]), (batch, 1))
            top = np.take_along_axis(top, np.argsort(-flat[rows, top], axis=1, kind="stable"), axis=1)
            parent, token = np.divmod(top, vocab)
            total = flat[rows, top]
            history = np.concatenate([history[rows, parent], token[..., None]], axis=2)
            if beam > 1:
                past.reorder_cache(torch.from_numpy((rows * beam + parent).reshape(-1)))
            ids = torch.from_numpy(token.reshape(-1, 1))
    return history[np.arange(batch), np.argmax(total, axis=1)]


def recovery_rate(guesses: np.ndarray, truth: np.ndarray) -> float:
    """The attack success rate: the fraction of tokens recovered exactly."""
    return float(np.mean(np.asarray(guesses) == np.asarray(truth)))


def recovery(guesses: np.ndarray, truth: np.ndarray, subsets: dict[str, np.ndarray]) -> dict[str, dict]:
    """Exact recovery on each subset of the tokens (B x T masks), with its bootstrap SE over the B prompts."""
    hits = np.asarray(guesses) == np.asarray(truth)
    out = {}
    for name, mask in subsets.items():
        found, counted = (hits & mask).sum(axis=1), mask.sum(axis=1)
        if counted.sum() == 0:
            out[name] = {"rate": None, "se": None, "tokens": 0}
            continue
        out[name] = {"rate": float(found.sum() / counted.sum()), "tokens": int(counted.sum()),
                     "se": bootstrap_se(lambda f, c: f / np.maximum(c, 1e-12), found, counted)}
    return out


def calibrate_mu(success_at: Callable[[float], float], target: float, grid: list[float],
                 steps: int) -> dict[str, float | None]:
    """The mu at which an attack's success reaches `target`, assuming it grows with mu (less noise).

    Success is read on the sorted `grid` upwards until it reaches the target; the bracket [low, high] that crosses it
    is bisected in log(mu) `steps` times, and mu is interpolated linearly in log(mu) between the bracket's ends.
    mu=None if even the largest grid value stays below the target; mu=grid[0] if the smallest already reaches it.
    """
    low = at_low = None
    for high in sorted(grid):
        at_high = success_at(high)
        if at_high >= target:
            break
        low, at_low = high, at_high
    else:
        return {"mu": None, "low": low, "high": None, "success_low": at_low, "success_high": None}
    if low is None:
        return {"mu": high, "low": None, "high": high, "success_low": None, "success_high": at_high}
    for _ in range(steps):
        middle = math.sqrt(low * high)
        rate = success_at(middle)
        if rate >= target:
            high, at_high = middle, rate
        else:
            low, at_low = middle, rate
    share = (target - at_low) / (at_high - at_low) if at_high > at_low else 1.0
    mu = math.exp(math.log(low) + min(1.0, max(0.0, share)) * (math.log(high) - math.log(low)))
    return {"mu": mu, "low": low, "high": high, "success_low": at_low, "success_high": at_high}
