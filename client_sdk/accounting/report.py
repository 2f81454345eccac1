"""One privacy report per mechanism setting and prompt length: exact numbers first, the paper's next to them."""

from __future__ import annotations

import math
from functools import lru_cache

from pydantic import BaseModel, Field

from client_sdk.accounting import binomial, gdp
from client_sdk.mechanism import MechanismParams

DEFAULT_DELTA = 1e-5


class PrivacyReport(BaseModel):
    """Privacy of sending a prompt's private tokens through one mechanism; public tokens cost nothing.

    Per token: neighbouring prompts differ in one private token. Per prompt: in every private token.
    """

    bits: int
    dim: int
    clip: float
    A: float = Field(description="the mechanism's scale A")
    private_tokens: int = Field(description="T: the tokens sent as mechanism levels (charged)")
    public_tokens: int = Field(default=0, description="tokens sent in the clear: template text, public parts, "
                               "placeholders (never charged)")
    delta: float
    epsilon_per_token: float = Field(description="exact epsilon(delta) when one token changes")
    epsilon: float = Field(description="exact epsilon(delta) when all T private tokens change (the prompt's cost)")
    mu_clt: float = Field(description="the paper's CLT mu per token")
    mu_clt_prompt: float = Field(description="the paper's CLT mu for the whole prompt, sqrt(T) * mu_clt")
    gamma: float = Field(description="Berry-Esseen error of the CLT per token")
    gamma_prompt: float = Field(description="Berry-Esseen error of the CLT for the whole prompt")
    epsilon_clt_per_token: float = Field(description="epsilon(delta) the paper's mu would claim for one token")
    mu_fitted: float = Field(description="smallest mu for which the exact per-token mechanism is mu-GDP")
    mu_fitted_prompt: float = Field(description="sqrt(T) * mu_fitted, a valid GDP bound for the prompt")
    bits_sent: int = Field(description="n*k*T bits of mechanism output")


@lru_cache(maxsize=256)
def _per_token(params: MechanismParams, delta: float) -> tuple[float, float, float]:
    trials, p = params.levels * params.dim, params.worst_case_p
    return (
        binomial.epsilon_for_delta(trials, p, delta),
        gdp.epsilon_for_delta(params.mu_clt, delta),
        binomial.fitted_gdp_mu(trials, p),
    )


def privacy_report(params: MechanismParams, tokens: int = 1, delta: float = DEFAULT_DELTA, *,
                   public_tokens: int = 0) -> PrivacyReport:
    """Exact epsilon(delta) per token and for `tokens` private tokens, with the paper's CLT mu and gamma beside
    them; `public_tokens` are only counted (a prompt without private tokens costs epsilon 0)."""
    if tokens < 0 or public_tokens < 0:
        raise ValueError(f"token counts must be non-negative, got {tokens} private and {public_tokens} public")
    trials, p = params.levels * params.dim, params.worst_case_p
    eps_token, eps_clt, mu_fit = _per_token(params, delta)
    eps_prompt = binomial.epsilon_for_delta(tokens * trials, p, delta)  # 0 trials (no private token): epsilon 0
    return PrivacyReport(
        bits=params.bits,
        dim=params.dim,
        clip=params.clip,
        A=params.scale,
        private_tokens=tokens,
        public_tokens=public_tokens,
        delta=delta,
        epsilon_per_token=eps_token,
        epsilon=eps_prompt,
        mu_clt=params.mu_clt,
        mu_clt_prompt=params.mu_clt * math.sqrt(tokens),
        gamma=gdp.berry_esseen_gamma(trials, p),
        gamma_prompt=gdp.berry_esseen_gamma(tokens * trials, p) if tokens else 0.0,
        epsilon_clt_per_token=eps_clt,
        mu_fitted=mu_fit,
        mu_fitted_prompt=mu_fit * math.sqrt(tokens),
        bits_sent=params.bits * params.dim * tokens,
    )
