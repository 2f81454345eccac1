"""The device's privacy policy: mu derived from the per-token cap, suggestions refused when looser."""

import math

import pytest

from client_sdk.accounting import binomial
from client_sdk.errors import BundleError, PolicyError
from client_sdk.mechanism import MAX_BITS, MechanismParams
from client_sdk.policy import REFERENCE_MU, PrivacyPolicy, epsilon_per_token, reference_mechanism


def exact(params: MechanismParams) -> float:
    return binomial.epsilon_for_delta(params.levels * params.dim, params.worst_case_p, 1e-5)


def test_the_default_per_token_cap_is_the_reference_mechanisms_exact_epsilon() -> None:
    policy = PrivacyPolicy.default()
    assert policy.epsilon_per_token == exact(reference_mechanism())
    assert policy.mechanism(bits=4, dim=72, clip=2.0).mu_clt == pytest.approx(REFERENCE_MU, rel=1e-6)


@pytest.mark.parametrize(("bits", "dim", "clip"), [(4, 72, 2.0), (2, 16, 0.05), (8, 8, 1.0)])
def test_the_derived_mu_is_the_largest_that_fits(bits: int, dim: int, clip: float) -> None:
    policy = PrivacyPolicy(epsilon_per_token=10.0)
    params = policy.mechanism(bits=bits, dim=dim, clip=clip)
    assert exact(params) <= 10.0
    looser = MechanismParams.from_mu(params.mu_clt * 1.001, bits=bits, dim=dim, clip=clip)
    assert exact(looser) > 10.0


def test_suggestions_and_explicit_settings_must_fit() -> None:
    policy = PrivacyPolicy(epsilon_per_token=10.0, allowed_bits=(2, 4))
    args = dict(dim=16, clip=0.05, suggested_bits=4)
    assert policy.choose(**args, bits=None, mu=None, suggested_mu=1.0).mu_clt == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(PolicyError, match="looser"):
        policy.choose(**args, bits=None, mu=None, suggested_mu=30.0)
    opted_in = policy.choose(**args, bits=None, mu=None, suggested_mu=30.0, allow_looser_suggestion=True)
    assert epsilon_per_token(opted_in, 1e-5) <= 10.0
    with pytest.raises(PolicyError, match="cap"):
        policy.choose(**args, bits=None, mu=30.0, suggested_mu=1.0)
    with pytest.raises(PolicyError, match="not allowed"):
        policy.choose(**args, bits=8, mu=None, suggested_mu=1.0)


def test_the_policy_says_what_is_private_in_a_plain_string() -> None:
    assert PrivacyPolicy.default().private == "message"  # the whole message, unless the app asks for detection
    assert set(PrivacyPolicy.default().treatments.values()) == {"placeholder"}
    with pytest.raises(ValueError, match="private"):
        PrivacyPolicy(epsilon_per_token=10.0, private="names")
    with pytest.raises(ValueError, match="treatment"):
        PrivacyPolicy(epsilon_per_token=10.0, private="detect", treatments={"PERSON": "public"})


@pytest.mark.parametrize(("setting", "value"), [
    ("epsilon_per_token", 0.0), ("epsilon_per_token", -1.0), ("epsilon_per_token", math.inf),
    ("epsilon_per_prompt", 0.0), ("epsilon_total", 0.0), ("epsilon_total", -1.0),
    ("delta", 0.0), ("delta", 1.0), ("delta", 1.5),
    ("allowed_bits", ()), ("allowed_bits", (0, 4)), ("allowed_bits", (MAX_BITS + 1,))])
def test_a_policy_out_of_range_is_refused_naming_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        PrivacyPolicy(**{"epsilon_per_token": 10.0, setting: value})


def test_small_positive_caps_and_every_bit_width_are_accepted() -> None:
    policy = PrivacyPolicy(epsilon_per_token=0.5, epsilon_per_prompt=0.5, epsilon_total=0.5, delta=0.5,
                           allowed_bits=(1, MAX_BITS))
    assert (policy.epsilon_per_token, policy.epsilon_per_prompt, policy.epsilon_total) == (0.5, 0.5, 0.5)


def test_the_bits_come_from_the_app_else_the_suggestion_else_the_policys_widest() -> None:
    policy = PrivacyPolicy(epsilon_per_token=10.0, allowed_bits=(2, 4))
    args = dict(dim=16, clip=0.05, mu=None, suggested_mu=1.0)
    assert policy.choose(**args, bits=2, suggested_bits=4).bits == 2
    assert policy.choose(**args, bits=None, suggested_bits=2).bits == 2
    with pytest.raises(PolicyError, match="n=8"):
        policy.choose(**args, bits=None, suggested_bits=8)
    assert policy.choose(**args, bits=None, suggested_bits=8, allow_looser_suggestion=True).bits == 4
    with pytest.raises(PolicyError, match="n=8"):
        policy.mechanism(bits=8, dim=16, clip=0.05)


def test_a_suggested_mu_the_mechanism_cannot_use_is_a_bundle_error_naming_it() -> None:
    with pytest.raises(BundleError, match="mu=0"):
        PrivacyPolicy(epsilon_per_token=10.0).choose(dim=16, clip=0.05, bits=None, mu=None, suggested_bits=4,
                                                     suggested_mu=0.0)
