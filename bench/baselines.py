"""The baselines DEL is compared with: the Gaussian mechanism on full embeddings, with and without quantization.

Per token, the embedding is clipped to L2 norm C and N(0, sigma^2 I) is added with sigma = 2C / mu: replacing one
token moves the clipped embedding by at most 2C, so this is exactly mu-GDP per token, the same guarantee the DEL
rows are calibrated to (by the CLT). It sends b float32s per token. The quantized variant rounds each noisy
coordinate to one of 2^n evenly spaced levels over [-R, R] (post-processing: the same privacy) and sends n*b bits.
"""

from __future__ import annotations

import numpy as np


def clip_norm(embeddings: np.ndarray, bound: float) -> np.ndarray:
    """Scale each row down to L2 norm at most `bound`."""
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def gaussian_mechanism(embeddings: np.ndarray, bound: float, mu: float, rng: np.random.Generator) -> np.ndarray:
    """mu-GDP per token: clip to norm `bound`, add N(0, (2 bound / mu)^2) to every coordinate."""
    return clip_norm(embeddings, bound) + rng.normal(scale=2 * bound / mu, size=embeddings.shape)


def quantize_uniform(values: np.ndarray, bits: int, limit: float) -> np.ndarray:
    """Round each value to the nearest of 2^bits evenly spaced levels over [-limit, limit] (what the server reads)."""
    steps = 2**bits - 1
    index = np.rint((np.clip(values, -limit, limit) + limit) / (2 * limit) * steps)
    return index / steps * 2 * limit - limit
