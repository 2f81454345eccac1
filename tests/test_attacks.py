"""Token-recovery attacks and the empirical audit, on random tables and the client's real quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from bench.attacks import maximum_likelihood, nearest_neighbour, recovery_rate
from bench.audit import audit_epsilon, clopper_pearson_upper
from client_sdk.accounting import privacy_report
from client_sdk.mechanism import MechanismParams, dequantize, quantize

VOCAB, DIM, CLIP = 500, 16, 1.0


def attack_rates(mu: float, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    table = np.clip(rng.normal(size=(VOCAB, DIM)), -CLIP, CLIP)
    tokens = rng.integers(VOCAB, size=2000)
    params = MechanismParams.from_mu(mu, bits=4, dim=DIM, clip=CLIP)
    levels = quantize(table[tokens], params, rng)
    return (recovery_rate(nearest_neighbour(dequantize(levels, params), table), tokens),
            recovery_rate(maximum_likelihood(levels, table, params), tokens))


def test_attacks_recover_everything_when_loose_and_nothing_when_strict() -> None:
    assert min(attack_rates(1000.0)) > 0.99
    assert max(attack_rates(0.05)) < 0.01  # chance is 1/500


def test_the_likelihood_attack_is_at_least_as_strong_as_nearest_neighbour() -> None:
    nn, ml = attack_rates(15.0)
    assert 0.05 < nn <= ml


def test_a_log_prior_moves_the_guess() -> None:
    params = MechanismParams.from_mu(0.01, bits=4, dim=DIM, clip=CLIP)
    levels = quantize(np.zeros((3, DIM)), params, np.random.default_rng(0))
    prior = np.full((3, VOCAB), -1e9)
    prior[:, 7] = 0.0
    table = np.random.default_rng(1).uniform(-CLIP, CLIP, size=(VOCAB, DIM))
    assert maximum_likelihood(levels, table, params, prior).tolist() == [7, 7, 7]


def test_clopper_pearson_matches_the_closed_form_at_zero_failures() -> None:
    assert clopper_pearson_upper(0, 1000, 0.95) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-9)
    assert clopper_pearson_upper(1000, 1000, 0.95) == 1.0


@pytest.mark.parametrize("mu", [0.5, 1.5, 10.0])
def test_the_audit_never_exceeds_the_accountant(mu: float) -> None:
    params = MechanismParams.from_mu(mu, bits=4, dim=72, clip=2.0)
    audit = audit_epsilon(params, tokens=1, samples=40_000, delta=1e-5, rng=np.random.default_rng(0))
    assert 0 < audit.epsilon_lower <= privacy_report(params, 1).epsilon_per_token


def test_the_gaussian_baseline_has_the_calibrated_noise_and_its_quantized_form_n_bits() -> None:
    from bench.baselines import clip_norm, gaussian_mechanism, quantize_uniform

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20_000, 8)) * 3
    assert np.linalg.norm(clip_norm(rows, 1.5), axis=1).max() == pytest.approx(1.5)
    noisy = gaussian_mechanism(np.zeros((20_000, 8)), bound=1.5, mu=2.0, rng=rng)
    assert noisy.std() == pytest.approx(2 * 1.5 / 2.0, rel=0.02)  # sigma = 2C / mu
    assert len(np.unique(quantize_uniform(noisy, 2, 3.0))) == 4
