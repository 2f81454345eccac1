"""The DEL stochastic n-bit quantization mechanism, vectorised with numpy.

Per coordinate v (clipped to [-c, c]), with u = 2**n - 1 levels and scale A >= c:
K ~ Binomial(u, (A + v) / (2A)). The wire carries K in n bits; the server reads
A * (2K/u - 1), an unbiased estimate of v with variance (A**2 - v**2) / u.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from client_sdk.errors import MechanismError

MAX_BITS = 8
MIN_MU = 1e-3
"""The smallest per-token mu the SDK calibrates; the noise below it drowns any signal, and it bounds the scale A a
payload may carry (`max_scale`)."""


def _float32_ceil(x: float) -> float:
    """The smallest float32 value >= x, so a scale sent as float32 never loosens privacy."""
    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)


def calibrate_scale(mu: float, bits: int, dim: int, clip: float) -> float:
    """The DEL paper's CLT calibration: A = c * sqrt(4*u*k / mu**2 + 1) for a per-token mu."""
    if not (mu >= MIN_MU and math.isfinite(mu)):
        raise MechanismError(f"mu must be a finite number of at least {MIN_MU:g}, got {mu}")
    levels = 2**bits - 1
    return clip * math.sqrt(4.0 * levels * dim / mu**2 + 1.0)


def max_scale(bits: int, dim: int, clip: float) -> float:
    """The largest A the SDK produces for n bits, k dims and clip c (float32 as on the wire): A at mu = MIN_MU."""
    return _float32_ceil(calibrate_scale(MIN_MU, bits, dim, float(np.float32(clip))))


@dataclass(frozen=True)
class MechanismParams:
    """Settings of one mechanism: n bits, k dimensions, clip c and scale A, held as the float32 values the wire carries."""

    bits: int
    dim: int
    clip: float
    scale: float

    def __post_init__(self) -> None:
        # The wire carries c and A as float32; hold exactly those values (A rounded up, never loosening privacy).
        object.__setattr__(self, "clip", float(np.float32(self.clip)))
        object.__setattr__(self, "scale", _float32_ceil(self.scale))
        if not (isinstance(self.bits, int) and 1 <= self.bits <= MAX_BITS):
            raise MechanismError(f"bits must be an integer in 1..{MAX_BITS}, got {self.bits!r}")
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise MechanismError(f"dim must be a positive integer, got {self.dim!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise MechanismError(f"clip must be positive and finite, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > self.clip):
            raise MechanismError(f"scale A must be finite and greater than clip c={self.clip}, got {self.scale}")

    @classmethod
    def from_mu(cls, mu: float, *, bits: int, dim: int, clip: float) -> "MechanismParams":
        """Calibrate A for a target per-token mu (CLT), rounded up to float32 as the wire carries it."""
        clip = float(np.float32(clip))
        return cls(bits=bits, dim=dim, clip=clip, scale=calibrate_scale(mu, bits, dim, clip))

    @property
    def levels(self) -> int:
        """u = 2**n - 1, the number of Bernoulli trials per coordinate."""
        return 2**self.bits - 1

    @property
    def mu_clt(self) -> float:
        """The paper's CLT Gaussian-DP parameter for one token: 2c*sqrt(u*k) / sqrt(A**2 - c**2)."""
        return 2 * self.clip * math.sqrt(self.levels * self.dim) / math.sqrt(self.scale**2 - self.clip**2)

    @property
    def worst_case_p(self) -> float:
        """p = (A + c) / (2A): the success probability of one trial at v = +c."""
        return (self.scale + self.clip) / (2 * self.scale)


def secure_rng(seed: int | None = None) -> np.random.Generator:
    """A numpy Generator freshly seeded with 128 bits from the OS's secure source.

    Pass `seed` only in tests: a fixed seed makes the noise predictable.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))


def quantize(z: np.ndarray, params: MechanismParams, rng: np.random.Generator) -> np.ndarray:
    """Clip z to [-c, c] and draw K ~ Binomial(u, (A + v) / (2A)) per coordinate (uint8)."""
    v = np.clip(np.asarray(z, dtype=np.float64), -params.clip, params.clip)
    p = (params.scale + v) / (2 * params.scale)
    return rng.binomial(params.levels, p).astype(np.uint8)


def dequantize(levels: np.ndarray, params: MechanismParams) -> np.ndarray:
    """The server's unbiased reading A * (2K/u - 1), float32."""
    k = np.asarray(levels, dtype=np.float32)
    return np.float32(params.scale) * (k * np.float32(2.0 / params.levels) - np.float32(1.0))
