"""The mechanism's statistics against closed forms, with tolerances from standard errors."""

import math

import numpy as np
import pytest
from scipy.stats import binom, chisquare, norm

from client_sdk.errors import MechanismError
from client_sdk.mechanism import (MIN_MU, MechanismParams, calibrate_scale, dequantize, max_scale, quantize,
                                  secure_rng)

Z = 5.0  # a 5-sigma band: a correct implementation fails about once in 1.7 million checks


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_dequantized_is_unbiased_with_the_stated_variance(bits: int) -> None:
    params = MechanismParams(bits=bits, dim=7, clip=0.5, scale=1.3)
    v = np.array([-0.5, -0.3, -0.1, 0.0, 0.2, 0.4, 0.5])
    samples = 200_000
    levels = quantize(np.tile(v, (samples, 1)), params, secure_rng(1234 + bits))
    estimates = dequantize(levels, params).astype(np.float64)

    u, a = params.levels, params.scale
    p = (a + v) / (2 * a)
    # the levels are Binomial(u, p) draws: a chi-square test per coordinate (levels expected fewer than 5 times
    # pooled into one cell), at the 5-sigma level
    for j in range(len(v)):
        expected = binom.pmf(np.arange(u + 1), u, p[j]) * samples
        observed = np.bincount(levels[:, j], minlength=u + 1)
        rare = expected < 5
        if rare.any():
            observed = np.append(observed[~rare], observed[rare].sum())
            expected = np.append(expected[~rare], expected[rare].sum())
        assert chisquare(observed, expected, sum_check=False).pvalue > 2 * norm.sf(Z)
    variance = (a**2 - v**2) / u  # the stated variance (the module's docstring)
    mean_se = np.sqrt(variance / samples)
    assert np.all(np.abs(estimates.mean(axis=0) - v) < Z * mean_se)

    fourth = (2 * a / u) ** 4 * u * p * (1 - p) * (1 + 3 * (u - 2) * p * (1 - p))
    var_se = np.sqrt((fourth - variance**2) / samples)
    # plus the second-order term from estimating the mean (it alone remains when u=1, v=0: every draw is +-A)
    tolerance = Z * var_se + Z**2 * variance / samples
    assert np.all(np.abs(estimates.var(axis=0, ddof=1) - variance) < tolerance)


def test_values_outside_the_clip_are_clipped() -> None:
    params = MechanismParams(bits=2, dim=2, clip=0.1, scale=0.2)
    samples = 100_000
    estimates = dequantize(quantize(np.tile([5.0, -5.0], (samples, 1)), params, secure_rng(7)), params)
    se = math.sqrt((0.2**2 - 0.1**2) / params.levels / samples)
    assert abs(estimates[:, 0].mean() - 0.1) < Z * se
    assert abs(estimates[:, 1].mean() + 0.1) < Z * se


def test_levels_stay_in_range_and_fit_n_bits() -> None:
    params = MechanismParams.from_mu(50.0, bits=3, dim=64, clip=0.05)
    levels = quantize(np.random.default_rng(0).normal(size=(100, 64)), params, secure_rng(1))
    assert levels.dtype == np.uint8 and levels.max() <= 7 and levels.min() >= 0


def test_calibration_gives_the_requested_clt_mu() -> None:
    for mu in (0.5, 1.0, 5.0, 52.0):
        params = MechanismParams.from_mu(mu, bits=4, dim=128, clip=0.05)
        assert params.scale == pytest.approx(calibrate_scale(mu, 4, 128, params.clip), rel=1e-6)
        # A is rounded *up* to float32, so the achieved mu never exceeds the request
        assert params.mu_clt <= mu and params.mu_clt == pytest.approx(mu, rel=1e-6)
        assert np.float32(params.scale) == params.scale


def test_fresh_seed_per_call_and_reproducible_test_seed() -> None:
    params = MechanismParams.from_mu(5.0, bits=4, dim=64, clip=0.05)
    z = np.zeros((50, 64))
    assert not np.array_equal(quantize(z, params, secure_rng()), quantize(z, params, secure_rng()))
    assert np.array_equal(quantize(z, params, secure_rng(3)), quantize(z, params, secure_rng(3)))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [(dict(bits=0, dim=4, clip=0.1, scale=1.0), "bits"), (dict(bits=9, dim=4, clip=0.1, scale=1.0), "bits"),
     (dict(bits=4, dim=0, clip=0.1, scale=1.0), "dim"), (dict(bits=4, dim=4, clip=0.1, scale=0.1), "scale"),
     (dict(bits=4, dim=4, clip=-1.0, scale=1.0), "clip"), (dict(bits=4, dim=4, clip=0.0, scale=1.0), "clip"),
     (dict(bits=4, dim=4, clip=0.1, scale=float("inf")), "scale")],
)
def test_invalid_settings_raise_naming_the_setting(kwargs: dict, named: str) -> None:
    with pytest.raises(MechanismError, match=named):
        MechanismParams(**kwargs)


class RecordingRng:
    """Stands in for the generator: records the binomial's (u, p) and draws level 0."""

    def binomial(self, n: int, p: np.ndarray) -> np.ndarray:
        self.n, self.p = n, p
        return np.zeros(np.shape(p), dtype=np.int64)


def test_the_levels_are_drawn_with_the_stated_probability_in_double_precision() -> None:
    params = MechanismParams(bits=3, dim=3, clip=0.25, scale=0.7)
    rng = RecordingRng()
    quantize(np.array([[-1.0, 0.1, 0.2]], dtype=np.float32), params, rng)  # float32 in, as a model may give
    v = np.array([[-0.25, np.float32(0.1), np.float32(0.2)]], dtype=np.float64)
    assert rng.n == 7 and np.array_equal(rng.p, (params.scale + v) / (2 * params.scale))


def test_dequantized_values_are_float32_whatever_the_levels_type() -> None:
    params = MechanismParams(bits=2, dim=2, clip=0.25, scale=0.5)
    estimates = dequantize([[0, 3]], params)
    assert estimates.dtype == np.float32 and estimates.tolist() == [[-0.5, 0.5]]


def test_a_scale_float32_holds_exactly_is_kept_and_one_it_cannot_is_rounded_up() -> None:
    assert MechanismParams(bits=1, dim=1, clip=0.25, scale=0.5).scale == 0.5  # k = 1 is a valid dimension
    scale = MechanismParams(bits=1, dim=1, clip=0.25, scale=0.1 + 0.5).scale
    assert scale > 0.6 and scale == np.float32(scale) and np.nextafter(np.float32(scale), np.float32(0)) < 0.6


@pytest.mark.parametrize("mu", [MIN_MU / 2, float("inf"), float("nan")])
def test_calibration_refuses_a_mu_outside_the_calibrated_range(mu: float) -> None:
    with pytest.raises(MechanismError, match="mu"):
        calibrate_scale(mu, 4, 8, 0.05)
    assert calibrate_scale(MIN_MU, 4, 8, 0.05) > 0  # the smallest mu is calibrated


def test_the_largest_scale_is_the_one_calibrated_at_the_smallest_mu() -> None:
    # the wire's bound on A: exactly from_mu's A at MIN_MU (from the float32 clip, rounded up to float32)
    largest = MechanismParams.from_mu(MIN_MU, bits=4, dim=64, clip=0.05).scale
    assert max_scale(4, 64, 0.05) == largest
    assert MechanismParams.from_mu(1.0, bits=4, dim=64, clip=0.05).scale < largest
