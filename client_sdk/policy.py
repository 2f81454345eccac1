"""The device's privacy policy: how much privacy one token, one prompt and one budget key may spend.

The server never chooses the client's privacy. The mechanism's mu is derived here, on the device: the
largest mu whose exact per-token epsilon(delta) (client_sdk.accounting) fits the policy's cap for the
chosen projection's k and c and the chosen n. The bundle's defaults are suggestions only; a suggestion
looser than the policy raises `PolicyError` unless the app opts in (`allow_looser_bundle`), in which case
the policy's own mu is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Mapping

from client_sdk.accounting import DEFAULT_DELTA
from client_sdk.accounting import binomial
from client_sdk.errors import BundleError, MechanismError, PolicyError
from client_sdk.mechanism import MAX_BITS, MechanismParams

# The default operating point, from measurement (docs/BENCHMARKS.md, "The default operating point"): at n = 4,
# k = 72 and the shipped projection's clip c = 2.0, the strongest attack in bench/ recovers 5% of WikiText-2 test
# tokens at mu = 4.90; the default sits below that, at mu = 4, where it recovers 3.6% (+- 0.4%). The per-token cap
# is computed from these settings (exact epsilon(1e-5), 24.26), not copied.
REFERENCE_MU = 4.0
REFERENCE_BITS, REFERENCE_DIM, REFERENCE_CLIP = 4, 72, 2.0
DEFAULT_PROMPT_TOKENS = 256
"""The default per-prompt cap lets this many private tokens through at the reference mechanism."""
DEFAULT_TOTAL_TOKENS = 100_000
"""The default cumulative cap lets this many private tokens through per budget key at the reference mechanism."""


DETECT_TREATMENTS: Mapping[str, str] = {label: "placeholder" for label in (
    "PERSON", "LOCATION", "ORGANIZATION", "EMAIL", "PHONE", "CARD", "IBAN", "ACCOUNT", "DATE_OF_BIRTH", "DATE", "SSN",
    "NI_NUMBER")}
"""Detected spans become typed placeholders: the value never leaves the device and costs no epsilon, and the model
reads a coherent slot it can refer to; noise would send levels the model cannot read at the default mu either."""


def check_private(private: str) -> None:
    if private not in ("message", "detect"):
        raise ValueError(f"private must be 'message' (the whole message private) or 'detect', got {private!r}")


def reference_mechanism(mu: float = REFERENCE_MU) -> MechanismParams:
    return MechanismParams.from_mu(mu, bits=REFERENCE_BITS, dim=REFERENCE_DIM, clip=REFERENCE_CLIP)


def _trials_p(params: MechanismParams) -> tuple[int, float]:
    return params.levels * params.dim, params.worst_case_p


@lru_cache(maxsize=256)
def epsilon_per_token(params: MechanismParams, delta: float) -> float:
    """Exact epsilon(delta) of one private token through this mechanism."""
    return binomial.epsilon_for_delta(*_trials_p(params), delta)


@lru_cache(maxsize=16)
def _reference_epsilon(tokens: int, delta: float) -> float:
    trials, p = _trials_p(reference_mechanism())
    return binomial.epsilon_for_delta(tokens * trials, p, delta)


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the device allows. Epsilons are at `delta`; None means no cap.

    epsilon_per_token: cap on one private token's exact epsilon (this fixes the mechanism's mu).
    epsilon_per_prompt: cap on one prompt's private tokens together.
    epsilon_total: cap on everything a budget key ever sends, composed (client_sdk.accounting.composition).
    allowed_bits: the n the device may use.
    private: what is private in a message given as a plain string: "message" (all of it, noised: the default) or
        "detect" (only what the on-device detector finds, client_sdk.detect; the rest is sent in the clear).
    treatments: with "detect", the treatment per label, "placeholder" or "noise" (DETECT_TREATMENTS by default:
        every label a placeholder).
    """

    epsilon_per_token: float
    epsilon_per_prompt: float | None = None
    epsilon_total: float | None = None
    delta: float = DEFAULT_DELTA
    allowed_bits: tuple[int, ...] = tuple(range(1, MAX_BITS + 1))
    private: Literal["message", "detect"] = "message"
    treatments: Mapping[str, str] = field(default_factory=lambda: dict(DETECT_TREATMENTS), hash=False)

    def __post_init__(self) -> None:
        if not (self.epsilon_per_token > 0 and math.isfinite(self.epsilon_per_token)):
            raise ValueError(f"epsilon_per_token must be positive and finite, got {self.epsilon_per_token}")
        for name in ("epsilon_per_prompt", "epsilon_total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not self.allowed_bits or any(b not in range(1, MAX_BITS + 1) for b in self.allowed_bits):
            raise ValueError(f"allowed_bits must be a non-empty subset of 1..{MAX_BITS}, got {self.allowed_bits}")
        check_private(self.private)
        if any(t not in ("placeholder", "noise") for t in self.treatments.values()):
            raise ValueError(f"a detected label's treatment is 'placeholder' or 'noise', got {dict(self.treatments)}")

    @classmethod
    def default(cls) -> "PrivacyPolicy":
        """The SDK's default: the reference operating point per token, DEFAULT_PROMPT_TOKENS per prompt and
        DEFAULT_TOTAL_TOKENS per key at the reference mechanism (exact epsilons, computed once)."""
        return _default_policy()

    def permits(self, params: MechanismParams) -> bool:
        """Whether one private token through `params` stays within the per-token cap (and n is allowed)."""
        return params.bits in self.allowed_bits and epsilon_per_token(params, self.delta) <= self.epsilon_per_token

    def mechanism(self, *, bits: int, dim: int, clip: float) -> MechanismParams:
        """The mechanism with the largest mu whose exact per-token epsilon fits the cap."""
        if bits not in self.allowed_bits:
            raise PolicyError(f"n={bits} bits is not allowed by the policy (allowed: {self.allowed_bits})")
        return _largest_mu_mechanism(self.epsilon_per_token, self.delta, bits, dim, float(clip))

    def choose(self, *, dim: int, clip: float, bits: int | None, mu: float | None, suggested_bits: int,
               suggested_mu: float, allow_looser_suggestion: bool = False) -> MechanismParams:
        """The mechanism to use: the app's explicit `bits`/`mu` if they fit the policy (PolicyError otherwise);
        else the server's suggestion if it fits, else PolicyError, or with `allow_looser_suggestion` the policy's mu.
        """
        if bits is not None and bits not in self.allowed_bits:
            raise PolicyError(f"n={bits} bits is not allowed by the policy (allowed: {self.allowed_bits})")
        if mu is not None:
            params = MechanismParams.from_mu(mu, bits=bits or suggested_bits, dim=dim, clip=clip)
            if not self.permits(params):
                raise PolicyError(f"mu={mu:g} costs epsilon {epsilon_per_token(params, self.delta):.4g} per token, "
                                  f"over the policy's cap {self.epsilon_per_token:.4g}")
            return params
        n = bits if bits is not None else suggested_bits
        if n not in self.allowed_bits:
            if not allow_looser_suggestion:
                raise PolicyError(f"the server suggests n={n} bits, which the policy does not allow "
                                  f"({self.allowed_bits}); pass bits= or allow_looser_bundle=True")
            n = max(self.allowed_bits)
        try:
            suggestion = MechanismParams.from_mu(suggested_mu, bits=n, dim=dim, clip=clip)
        except MechanismError as err:
            raise BundleError(f"the server suggests mu={suggested_mu:g}, which the mechanism cannot use ({err}); "
                              f"nothing was sent") from err
        if self.permits(suggestion):
            return suggestion
        if not allow_looser_suggestion:
            raise PolicyError(
                f"the server suggests mu={suggested_mu:g}, epsilon {epsilon_per_token(suggestion, self.delta):.4g} "
                f"per token, looser than the policy's cap {self.epsilon_per_token:.4g}; refusing (pass "
                f"allow_looser_bundle=True to ignore the suggestion and use the policy's own mu)")
        return self.mechanism(bits=n, dim=dim, clip=clip)


@lru_cache(maxsize=256)
def _largest_mu_mechanism(cap: float, delta: float, bits: int, dim: int, clip: float) -> MechanismParams:
    def fits(mu: float) -> bool:
        return epsilon_per_token(MechanismParams.from_mu(mu, bits=bits, dim=dim, clip=clip), delta) <= cap

    lo, hi = 1e-3, 1.0
    if not fits(lo):
        raise PolicyError(f"no mechanism at n={bits}, k={dim}, c={clip} fits epsilon {cap:g} per token")
    while fits(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            break
    for _ in range(60):  # bisection in log space; invariant: lo fits, hi does not
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return MechanismParams.from_mu(lo, bits=bits, dim=dim, clip=clip)


@lru_cache(maxsize=1)
def _default_policy() -> PrivacyPolicy:
    return PrivacyPolicy(epsilon_per_token=epsilon_per_token(reference_mechanism(), DEFAULT_DELTA),
                         epsilon_per_prompt=_reference_epsilon(DEFAULT_PROMPT_TOKENS, DEFAULT_DELTA),
                         epsilon_total=_reference_epsilon(DEFAULT_TOTAL_TOKENS, DEFAULT_DELTA))
