"""Cumulative privacy of a budget key's past charges, tighter than adding epsilons.

Every charge sends some private tokens through a mechanism whose worst case is Bin(N, p) versus
Bin(N, 1-p) per token (see `binomial`). Charges whose mechanisms share p compose *exactly*: the sum of
independent Bin(N_i, p) is Bin(sum N_i, p), and the privacy loss of the pair depends on the sum alone.
So a ledger is a few groups {p: total trials}; one group is accounted exactly. Several groups are composed
with dp-accounting's privacy loss distributions (pessimistic, so never below the exact composition) while
their supports are small; past that, by domination: a trial with p' < p is a post-processing of one with p
(flip each outcome with probability (p - p') / (2p - 1)), so all groups together are dominated by one
binomial with the largest p and all the trials, accounted exactly. Both are upper bounds.

A cap check needs no epsilon: for one group it is an integer comparison against the largest number of
trials whose exact epsilon(delta) fits the cap, found once by bisection and cached.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Mapping

from client_sdk.accounting import binomial, pld

Groups = tuple[tuple[float, int], ...]
"""(p, total trials) per mechanism worst case, sorted."""


def as_groups(totals: Mapping[float, int]) -> Groups:
    return tuple(sorted((float(p), int(n)) for p, n in totals.items() if n > 0))


@lru_cache(maxsize=1024)
def max_trials(p: float, epsilon: float, delta: float) -> int:
    """The largest N with exact epsilon(delta) of Bin(N, p) vs Bin(N, 1-p) at most `epsilon` (0 if none)."""
    if binomial.delta_for_epsilon(1, p, epsilon) > delta:
        return 0
    lo, hi = 1, 2
    while binomial.delta_for_epsilon(hi, p, epsilon) <= delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if binomial.delta_for_epsilon(mid, p, epsilon) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


PLD_MAX_SUPPORT = 200_000
"""Compose several groups with PLDs only while their supports (about 24 standard deviations each) stay this small."""


def dominating_group(groups: Groups) -> tuple[float, int]:
    """One binomial that dominates all the groups: the largest p, all the trials."""
    return max(p for p, _ in groups), sum(n for _, n in groups)


def pld_affordable(groups: Groups) -> bool:
    return sum(24 * math.sqrt(n * p * (1 - p)) + n * (2 * p - 1) for p, n in groups) <= PLD_MAX_SUPPORT


@lru_cache(maxsize=1024)
def composed_epsilon(groups: Groups, delta: float) -> float:
    """epsilon(delta) of all the groups together: exact for one group; for several, a PLD upper bound while
    affordable, else the dominating binomial's exact epsilon."""
    if not groups:
        return 0.0
    if len(groups) == 1 or not pld_affordable(groups):
        p, trials = dominating_group(groups)
        return binomial.epsilon_for_delta(trials, p, delta)
    interval = min(binomial.log_odds(p) for p, _ in groups) / 4
    total = None
    for p, trials in groups:
        dist = pld.binomial_pld(trials, p, interval=interval)
        total = dist if total is None else total.compose(dist)
    eps = total.get_epsilon_for_delta(delta)
    if not math.isfinite(eps):
        raise ArithmeticError("dp-accounting returned a non-finite epsilon")
    return float(eps)


def fits(groups: Groups, epsilon: float, delta: float) -> bool:
    """Whether the composition of `groups` stays within `epsilon` at `delta`."""
    if epsilon < 0:
        return False
    if not groups:
        return True
    if len(groups) == 1 or not pld_affordable(groups):
        p, trials = dominating_group(groups)
        return trials <= max_trials(p, epsilon, delta)
    return composed_epsilon(groups, delta) <= epsilon
