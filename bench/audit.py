"""An empirical lower bound on epsilon: a distinguishing game between the worst-case neighbours.

The client's real `quantize` runs on the two extreme inputs, every coordinate at +c and every coordinate at -c
(T tokens of k coordinates each). The likelihood-ratio test between them thresholds the sum of the levels. The
threshold is chosen on one half of the samples and its error rates are measured on the other half, each bounded
with a Clopper-Pearson interval. Any (epsilon, delta)-DP mechanism must satisfy FPR + e^eps FNR >= 1 - delta
(and the same with the two swapped), so

    epsilon >= max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))

holds with the stated confidence. It can never exceed the accountant's epsilon if the accountant is right. With
N samples it cannot exceed about log(N) either, so it only audits the strict regime closely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from client_sdk.mechanism import MechanismParams, quantize


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower: float
    false_positive_rate: float
    false_negative_rate: float
    threshold: int
    samples: int


def clopper_pearson_upper(failures: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """One-sided upper confidence bounds on binomial rates."""
    failures = np.asarray(failures)
    upper = beta.ppf(confidence, failures + 1, np.maximum(trials - failures, 1))
    return np.where(failures >= trials, 1.0, upper)


def epsilon_lower_bound(false_positives: np.ndarray, false_negatives: np.ndarray, trials: int, delta: float,
                        confidence: float) -> np.ndarray:
    """The epsilon that error counts (out of `trials` each) prove, at the given one-sided confidence."""
    fpr_hi = clopper_pearson_upper(false_positives, trials, confidence)
    fnr_hi = clopper_pearson_upper(false_negatives, trials, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1 - delta - fnr_hi, 0) / fpr_hi)
        other = np.log(np.maximum(1 - delta - fpr_hi, 0) / fnr_hi)
    return np.maximum(0.0, np.nan_to_num(np.maximum(one, other), nan=0.0, neginf=0.0))


def audit_epsilon(params: MechanismParams, tokens: int, samples: int, delta: float, rng: np.random.Generator,
                  confidence: float = 0.95) -> AuditResult:
    """Play the game `samples` times per neighbour and return the epsilon it proves (one-sided, `confidence`)."""
    shape = (samples, tokens * params.dim)
    plus = quantize(np.full(shape, params.clip), params, rng).sum(axis=1, dtype=np.int64)
    minus = quantize(np.full(shape, -params.clip), params, rng).sum(axis=1, dtype=np.int64)
    half = samples // 2

    def errors(plus_sums: np.ndarray, minus_sums: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
        """Guess "plus" when the sum is >= t: false positives among minus, false negatives among plus."""
        fp = len(minus_sums) - np.searchsorted(np.sort(minus_sums), thresholds, side="left")
        fn = np.searchsorted(np.sort(plus_sums), thresholds, side="left")
        return fp, fn

    candidates = np.unique(np.concatenate([plus[:half], minus[:half]]))
    chosen = candidates[np.argmax(epsilon_lower_bound(*errors(plus[:half], minus[:half], candidates), half,
                                                      delta, confidence))]
    fp, fn = errors(plus[half:], minus[half:], np.array([chosen]))
    test = samples - half
    return AuditResult(epsilon_lower=float(epsilon_lower_bound(fp, fn, test, delta, confidence)[0]),
                       false_positive_rate=int(fp[0]) / test, false_negative_rate=int(fn[0]) / test,
                       threshold=int(chosen), samples=samples)
