"""Composition with Google's dp-accounting: privacy loss distributions (PLDs).

The per-token worst case is turned into a PLD from the two binomial log-pmfs and composed with
the library. The loss of outcome x is (2x - N) * r, on a lattice of step 2r; the discretisation
interval is chosen as r / m so the lattice is represented without rounding, which keeps the
support small (about 2N*m buckets per token) even where epsilon is in the thousands. With the
library's default interval of 1e-4 that regime needs tens of millions of buckets per token.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from client_sdk.accounting.binomial import log_odds

_TRUNCATION_NATS = -60.0


def binomial_pld(trials: int, p: float, buckets_per_step: int = 4,
                 interval: float | None = None) -> pld_lib.PrivacyLossDistribution:
    """The pessimistic PLD of Bin(trials, p) vs Bin(trials, 1-p), truncated below e^-60 of mass.

    `interval` (default: the loss lattice's step over `buckets_per_step`) must be shared by PLDs composed together.
    """
    spread = 12 * math.sqrt(trials * p * (1 - p)) + 16  # mass beyond 12 sd is far below e^-60
    x = np.arange(max(0, math.floor(trials * (1 - p) - spread)), min(trials, math.ceil(trials * p + spread)) + 1)
    log_upper = stats.binom.logpmf(x, trials, p)
    log_lower = log_upper[::-1]  # Bin(trials, 1-p) at x is Bin(trials, p) at trials - x
    keep = np.maximum(log_upper, log_lower) > _TRUNCATION_NATS
    interval = interval or log_odds(p) / buckets_per_step
    return pld_lib.from_two_probability_mass_functions(
        dict(zip(x[keep].tolist(), log_lower[keep].tolist())),
        dict(zip(x[keep].tolist(), log_upper[keep].tolist())),
        pessimistic_estimate=True,
        value_discretization_interval=interval,
        log_mass_truncation_bound=_TRUNCATION_NATS,
    )


def composed_epsilon(trials_per_token: int, p: float, tokens: int, delta: float) -> float:
    """epsilon(delta) for `tokens` changed tokens by PLD self-composition (an upper bound)."""
    pld = binomial_pld(trials_per_token, p)
    if tokens > 1:
        pld = pld.self_compose(tokens)
    eps = pld.get_epsilon_for_delta(delta)
    if not math.isfinite(eps):
        raise ArithmeticError("dp-accounting returned a non-finite epsilon")
    return float(eps)
