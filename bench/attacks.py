"""What an honest-but-curious server can recover from payloads: token-recovery attacks on the DEL mechanism.

- `nearest_neighbour`: the paper's embedding-inversion attack. Rebuild the embedding as the server does and
  take the vocabulary token whose input embedding is closest.
- `maximum_likelihood`: the stronger attack. The server knows the mechanism and the client's projected table, so
  it can score every token v by the exact likelihood of the received levels, sum_j log Binom(K_j; u, p_j(v)) with
  p_j(v) = (A + t_vj) / 2A, optionally plus a log prior over tokens (for example a language model's).

Both return one guessed token id per received token; `recovery_rate` is the fraction guessed exactly.
"""

from __future__ import annotations

import numpy as np

from client_sdk.mechanism import MechanismParams

CHUNK = 256


def nearest_neighbour(received: np.ndarray, embedding_table: np.ndarray) -> np.ndarray:
    """argmin_v ||e' - E_v|| for each received embedding e' (T x b) against the table E (V x b)."""
    table = np.asarray(embedding_table, dtype=np.float32)
    norms = (table**2).sum(axis=1)
    guesses = [np.argmin(norms[None] - 2 * np.asarray(chunk, dtype=np.float32) @ table.T, axis=1)
               for chunk in np.array_split(received, max(1, -(-len(received) // CHUNK)))]
    return np.concatenate(guesses)


def log_likelihoods(levels: np.ndarray, client_table: np.ndarray, params: MechanismParams) -> np.ndarray:
    """log P(levels | token v) for every token: (T x k) levels against the (V x k) client table -> (T x V).

    The binomial coefficients do not depend on v and are left out.
    """
    v = np.clip(np.asarray(client_table, dtype=np.float64), -params.clip, params.clip)
    p = (params.scale + v) / (2 * params.scale)
    log_p, log_q = np.log(p).T, np.log1p(-p).T  # k x V; p is strictly inside (0, 1) because A > c
    k = np.asarray(levels, dtype=np.float64)
    return k @ log_p + (params.levels - k) @ log_q


def maximum_likelihood(levels: np.ndarray, client_table: np.ndarray, params: MechanismParams,
                       log_prior: np.ndarray | None = None) -> np.ndarray:
    """argmax_v log P(levels | v) (+ log prior(v)) for each received token (T x k levels)."""
    guesses = []
    for start in range(0, len(levels), CHUNK):
        scores = log_likelihoods(levels[start : start + CHUNK], client_table, params)
        if log_prior is not None:
            scores = scores + log_prior[start : start + CHUNK]
        guesses.append(np.argmax(scores, axis=1))
    return np.concatenate(guesses)


def recovery_rate(guesses: np.ndarray, truth: np.ndarray) -> float:
    """The attack success rate: the fraction of tokens recovered exactly."""
    return float(np.mean(np.asarray(guesses) == np.asarray(truth)))
