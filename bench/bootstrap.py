"""Bootstrap standard errors over segments: every figure of a utility table is a statistic of per-segment values.

Rows of one table are scored on the same segments, so a statistic that combines rows (context retained, a
difference) is resampled with the same segment indices for all of them (a paired bootstrap).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

REPLICATES = 2000


def resample_indices(segments: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """(replicates x segments) indices drawn with replacement; fixed by the seed, so tables are reproducible."""
    return np.random.default_rng(seed).integers(segments, size=(replicates, segments))


def bootstrap_se(statistic: Callable[..., np.ndarray | float], *per_segment: np.ndarray,
                 replicates: int = REPLICATES, seed: int = 0) -> float:
    """The standard deviation of `statistic(*means)` over bootstrap resamples of the segments, where `means` are the
    resampled means of each per-segment array (all of one length, resampled together)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in per_segment]
    indices = resample_indices(len(arrays[0]), replicates, seed)
    means = [a[indices].mean(axis=1) for a in arrays]
    return float(np.std(statistic(*means), ddof=1))


def within(difference: float, se: float, multiple: float = 2.0) -> bool:
    """Whether a difference is smaller than `multiple` standard errors (not distinguishable at that level)."""
    return abs(difference) < multiple * se
