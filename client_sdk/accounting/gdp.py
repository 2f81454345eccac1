"""Gaussian differential privacy: the DEL paper's CLT view of the mechanism.

The paper approximates the worst case by Gaussians and calls the mechanism mu-GDP with
mu = 2c*sqrt(u*k) / sqrt(A**2 - c**2), up to a Berry-Esseen error gamma. These closed forms are
kept here for reporting next to the exact numbers in `binomial`.
"""

from __future__ import annotations

import math

from scipy import optimize, special

# Shevtsova (2011): sup |F_n - Phi| <= C * rho / (sigma**3 * sqrt(N)) for N i.i.d. summands.
BERRY_ESSEEN_CONSTANT = 0.4748


def clt_mu(bits: int, dim: int, clip: float, scale: float, tokens: int = 1) -> float:
    """The paper's mu for `tokens` changed tokens: 2c*sqrt(u*k*T) / sqrt(A**2 - c**2)."""
    levels = 2**bits - 1
    return 2 * clip * math.sqrt(levels * dim * tokens) / math.sqrt(scale**2 - clip**2)


def berry_esseen_gamma(trials: int, p: float) -> float:
    """Kolmogorov-distance bound between the standardised Binomial(trials, p) and N(0, 1).

    For Bernoulli(p) summands rho / sigma**3 = (p**2 + q**2) / sqrt(p*q), so
    gamma = C * (p**2 + q**2) / sqrt(trials * p * q). The paper's CLT claim holds up to gamma.
    """
    q = 1 - p
    return BERRY_ESSEEN_CONSTANT * (p * p + q * q) / math.sqrt(trials * p * q)


def log_delta_for_epsilon(mu: float, epsilon: float) -> float:
    """log delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2), in log space."""
    log_a = special.log_ndtr(-epsilon / mu + mu / 2)
    log_b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return float(log_a + math.log1p(-math.exp(log_b - log_a)))


def epsilon_for_delta(mu: float, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for a mu-GDP mechanism (stable for large mu)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_target = math.log(delta)
    if log_delta_for_epsilon(mu, 0.0) <= log_target:
        return 0.0
    upper = mu * mu / 2 + mu * (math.sqrt(2 * -log_target) + 1) + 1
    return float(optimize.brentq(lambda e: log_delta_for_epsilon(mu, e) - log_target, 0.0, upper, xtol=1e-12))
