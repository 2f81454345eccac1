"""Exact privacy of the DEL mechanism's worst case, computed in log space.

Two neighbouring tokens whose projected vectors sit at opposite corners (every coordinate +c
versus -c) give the observation X = sum of all levels: X ~ Binomial(N, p) versus Binomial(N, 1-p),
N = u*k per token (N = T*u*k for T changed tokens), p = (A + c) / (2A). Every other pair of
neighbours is a post-processing-dominated case, so this pair's trade-off curve and hockey-stick
divergence are the mechanism's exact privacy. Tails are summed as log-sum-exp of log-pmfs, so
epsilon in the thousands neither overflows nor rounds to zero.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

EXACT_CURVE_MAX_TRIALS = 4_000_000
_NEGLIGIBLE_NATS = 40.0
_SF_FLOOR = 1e-200


def _log_pmf(n: int, p: float, x: np.ndarray) -> np.ndarray:
    return stats.binom.logpmf(x, n, p)


def _log_window_sum(n: int, p: float, start: int, step: int) -> float:
    """log of sum of pmf(j) for j = start, start+step, ... to the end of the support.

    `start` lies on the far side of the mode, so terms decrease and the sum stops once
    they fall `_NEGLIGIBLE_NATS` below the running total. Chunks start small and double up to ten
    standard deviations, so a far tail (a few terms) costs little even when n is in the hundreds of millions.
    """
    max_chunk = int(10 * math.sqrt(n * p * (1 - p))) + 64
    chunk = min(256, max_chunk)
    total = -math.inf
    j = start
    while 0 <= j <= n:
        stop = min(n + 1, j + chunk) if step > 0 else max(-1, j - chunk)
        terms = _log_pmf(n, p, np.arange(j, stop, step))
        total = float(np.logaddexp(total, special.logsumexp(terms)))
        if terms[-1] < total - _NEGLIGIBLE_NATS:
            break
        j, chunk = stop, min(2 * chunk, max_chunk)
    return total


def log_sf(n: int, p: float, x: int) -> float:
    """log P(X >= x) for X ~ Binomial(n, p), accurate far into either tail."""
    if x <= 0:
        return 0.0
    if x > n:
        return -math.inf
    if x > n * p:
        tail = stats.binom.sf(x - 1, n, p)  # regularized incomplete beta: O(1), accurate while it does not underflow
        return math.log(tail) if tail > _SF_FLOOR else _log_window_sum(n, p, x, +1)
    return math.log1p(-math.exp(_log_window_sum(n, p, x - 1, -1)))


def _log_diff(log_a: float, log_b: float) -> float:
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b (log_a itself when log_b is -inf, -inf when they are equal)."""
    return log_a + math.log1p(-math.exp(log_b - log_a)) if log_b < log_a else -math.inf


def log_odds(p: float) -> float:
    """r = log(p / (1 - p)): the privacy loss grows by 2r per unit of X."""
    return math.log(p) - math.log1p(-p)


def delta_for_epsilon(n: int, p: float, epsilon: float) -> float:
    """Exact hockey-stick divergence delta(epsilon) of Bin(n, p) vs Bin(n, 1-p), p > 1/2."""
    r = log_odds(p)
    threshold = math.floor((epsilon / r + n) / 2) + 1  # smallest x with loss (2x - n) r > epsilon
    log_p_tail = log_sf(n, p, threshold)
    log_q_tail = log_sf(n, 1 - p, threshold)
    return math.exp(_log_diff(log_p_tail, epsilon + log_q_tail))  # 0 when threshold > n: both tails are empty


def epsilon_for_delta(n: int, p: float, delta: float) -> float:
    """Exact smallest epsilon with delta(epsilon) <= delta, for Bin(n, p) vs Bin(n, 1-p), p > 1/2."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (1/2, 1), got {p}")
    if delta_for_epsilon(n, p, 0.0) <= delta:
        return 0.0
    r = log_odds(p)
    log_delta = math.log(delta)

    def tails(t: int) -> tuple[float, float]:
        return log_sf(n, p, t), log_sf(n, 1 - p, t)

    def delta_at_segment_start(t: int) -> float:
        """log delta at epsilon = (2(t-1) - n) r, where the optimal rejection set is {X >= t}."""
        log_p_tail, log_q_tail = tails(t)
        return _log_diff(log_p_tail, (2 * (t - 1) - n) * r + log_q_tail)

    # Largest threshold t whose segment starts at a delta still >= the target.
    lo, hi = n // 2 + 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if delta_at_segment_start(mid) >= log_delta:
            lo = mid
        else:
            hi = mid - 1
    log_p_tail, log_q_tail = tails(lo)
    return max(0.0, _log_diff(log_p_tail, log_delta) - log_q_tail)


def log_type_one_errors(n: int, q: float) -> np.ndarray:
    """log alpha_x = log P(Y >= x), Y ~ Bin(n, q), for every threshold x = 0..n+1."""
    log_pmf = _log_pmf(n, q, np.arange(n + 1))
    tails = np.logaddexp.accumulate(log_pmf[::-1])[::-1]
    return np.append(np.minimum(tails, 0.0), -np.inf)


def tradeoff_vertices(n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (alpha, beta) of the exact trade-off curve, alpha increasing from 0 to 1.

    Testing Bin(n, 1-p) against Bin(n, p) and rejecting for X >= x gives alpha_x = P(Y >= x),
    and by symmetry beta_x = alpha_{n+1-x}. Randomised tests fill the straight segments between.
    """
    if n > EXACT_CURVE_MAX_TRIALS:
        raise ValueError(f"exact curve limited to {EXACT_CURVE_MAX_TRIALS} trials, got {n}")
    log_alpha = log_type_one_errors(n, 1 - p)
    alpha, beta = np.exp(log_alpha), np.exp(log_alpha[::-1])
    return alpha[::-1], beta[::-1]


def tradeoff_curve(n: int, p: float, alpha: np.ndarray) -> np.ndarray:
    """The exact trade-off function f(alpha): the smallest type II error of any level-alpha test."""
    vertex_alpha, vertex_beta = tradeoff_vertices(n, p)
    return np.interp(alpha, vertex_alpha, vertex_beta)


def _probit(log_u: np.ndarray, log_complement: np.ndarray) -> np.ndarray:
    """Phi^-1(u) from log u and log(1 - u), each taken where it is the smaller one (so computed from its own tail)."""
    return np.where(log_u <= log_complement, special.ndtri_exp(log_u), -special.ndtri_exp(log_complement))


def fitted_gdp_mu(n: int, p: float) -> float:
    """The smallest mu with f >= G_mu everywhere: the exact mechanism is mu-GDP for this mu.

    G_mu is convex and f is piecewise linear, so checking f's vertices suffices:
    mu >= Phi^-1(1 - alpha_x) - Phi^-1(beta_x) at each vertex. Where alpha_x or beta_x is within rounding of 1,
    its complement is summed from the other tail (1 - alpha_x = P(X >= n+1-x), 1 - beta_x = P(X >= x),
    X ~ Bin(n, p)), else those vertices would claim a far larger mu.
    """
    inner = slice(1, n + 1)  # x = 1..n; x = 0 and x = n+1 are the trivial tests (alpha or beta = 1)
    log_alpha = log_type_one_errors(n, 1 - p)[inner]  # reversed: x -> n+1-x, so log beta_x
    log_upper = log_type_one_errors(n, p)[inner]  # log P(X >= x)
    needed = _probit(log_upper[::-1], log_alpha) - _probit(log_alpha[::-1], log_upper)
    return float(np.max(needed))
