"""Accounting checked against closed forms, brute force, dp-accounting, and the reference values."""

import json
import math

import numpy as np
import pytest
from scipy import special, stats
from typer.testing import CliRunner

from client_sdk.accounting import binomial, gdp, pld, privacy_report
from client_sdk.cli import cli
from client_sdk.mechanism import MechanismParams


def paper_setting(mu: float) -> MechanismParams:
    return MechanismParams.from_mu(mu, bits=4, dim=128, clip=0.05)


def worst_case(params: MechanismParams) -> tuple[int, float]:
    return params.levels * params.dim, params.worst_case_p


def brute_force_epsilon(groups: list[tuple[int, float]], delta: float) -> float:
    """Independent exact epsilon(delta) of independent Bin(n_g, p_g) vs Bin(n_g, 1 - p_g), by enumeration.

    Over every joint outcome o, delta(eps) = sum_o max(0, P(o) - e^eps Q(o)); the loss of o is additive over
    groups, log(p_g / (1 - p_g)) * (2 x_g - n_g). Epsilon by bisection on the monotone delta(eps).
    """
    loss, prob = np.zeros(1), np.ones(1)
    for n, p in groups:
        x = np.arange(n + 1)
        r = math.log(p / (1 - p))
        loss = (loss[:, None] + (2 * x - n) * r).ravel()
        prob = (prob[:, None] * stats.binom.pmf(x, n, p)).ravel()

    def delta_at(eps: float) -> float:
        return float(np.sum(prob * -np.expm1(np.minimum(eps - loss, 0.0))))

    lo, hi = 0.0, float(loss.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_at(mid) <= delta else (mid, hi)
    return hi


@pytest.mark.parametrize(("mu", "tokens"), [(1.0, 1), (1.0, 64), (5.0, 1)])
def test_report_matches_brute_force(mu: float, tokens: int) -> None:
    params = paper_setting(mu)
    trials, p = worst_case(params)
    report = privacy_report(params, tokens=tokens, delta=1e-5)
    assert report.epsilon == pytest.approx(brute_force_epsilon([(tokens * trials, p)], 1e-5), rel=1e-6)


@pytest.mark.parametrize("mus", [(4.0,), (4.0, 4.0), (2.0, 4.0), (1.0, 3.0, 6.0)])
def test_the_cumulative_accountant_is_never_below_the_exact_composition(mus: tuple[float, ...]) -> None:
    """A key's charges (3 prompts per mechanism, small k so enumeration is exact) against brute force."""
    from client_sdk.accounting import composition

    charges = []
    for i, mu in enumerate(mus):
        params = MechanismParams.from_mu(mu, bits=2, dim=4 + i, clip=1.0)
        charges += [(tokens * params.levels * params.dim, params.worst_case_p) for tokens in (1, 2, 3)]
    totals: dict[float, int] = {}
    for trials, p in charges:
        totals[p] = totals.get(p, 0) + trials
    accountant = composition.composed_epsilon(composition.as_groups(totals), 1e-5)
    exact = brute_force_epsilon([(n, p) for p, n in totals.items()], 1e-5)
    assert accountant >= exact - 1e-9
    assert accountant <= exact * 1.02 + 0.05  # and tight: far below adding the charges' epsilons
    added = sum(brute_force_epsilon([charge], 1e-5) for charge in charges)
    assert accountant < added
    p_max, trials = composition.dominating_group(composition.as_groups(totals))
    assert binomial.epsilon_for_delta(trials, p_max, 1e-5) >= exact - 1e-9  # the bound for large ledgers
    assert composition.fits(composition.as_groups(totals), accountant + 1e-6, 1e-5)
    assert composition.fits(composition.as_groups(totals), accountant, 1e-5)  # the cap itself is within the cap
    assert not composition.fits(composition.as_groups(totals), exact * 0.99, 1e-5)


def test_one_trial_is_randomized_response() -> None:
    # N = 1: P = Bern(p), Q = Bern(1-p); delta(eps) = p - e^eps (1-p), so eps(delta) = log((p - delta)/(1 - p)).
    p, delta = 0.8, 0.01
    assert binomial.epsilon_for_delta(1, p, delta) == pytest.approx(math.log((p - delta) / (1 - p)), rel=1e-12)
    assert binomial.delta_for_epsilon(1, p, 0.5) == pytest.approx(p - math.exp(0.5) * (1 - p), rel=1e-12)


@pytest.mark.parametrize("n", [1, 7, 30, 301])
@pytest.mark.parametrize("p", [0.51, 0.6, 0.95])
def test_hockey_stick_matches_brute_force(n: int, p: float) -> None:
    x = np.arange(n + 1)
    pmf_p, pmf_q = stats.binom.pmf(x, n, p), stats.binom.pmf(x, n, 1 - p)
    for eps in (0.0, 0.1, 1.0, 3.0, 10.0):
        brute = np.maximum(pmf_p - np.exp(eps) * pmf_q, 0).sum()
        assert binomial.delta_for_epsilon(n, p, eps) == pytest.approx(brute, rel=1e-9, abs=1e-300)


def test_epsilon_inverts_delta_in_the_loose_regime() -> None:
    # The paper's regime: epsilon in the hundreds to tens of thousands.
    for mu, tokens in ((20.0, 1), (60.0, 1), (60.0, 64)):
        trials, p = worst_case(paper_setting(mu))
        eps = binomial.epsilon_for_delta(tokens * trials, p, 1e-5)
        assert 100 < eps < 1e6 and math.isfinite(eps)
        assert binomial.delta_for_epsilon(tokens * trials, p, eps) == pytest.approx(1e-5, rel=1e-6)
        assert binomial.delta_for_epsilon(tokens * trials, p, eps * 0.999) > 1e-5


def test_naive_tail_underflows_where_the_log_space_one_does_not() -> None:
    trials, p = worst_case(paper_setting(60.0))
    x = int(0.75 * trials)
    assert stats.binom.sf(x - 1, trials, 1 - p) == 0.0  # what naive code would use: silently 0
    log_tail = binomial.log_sf(trials, 1 - p, x)
    exact = special.logsumexp(stats.binom.logpmf(np.arange(x, trials + 1), trials, 1 - p))
    assert log_tail == pytest.approx(exact, rel=1e-10) and log_tail < -745


def test_dp_accounting_composition_agrees_and_is_pessimistic() -> None:
    for mu in (1.0, 20.0, 60.0):
        trials, p = worst_case(paper_setting(mu))
        for tokens in (1, 64):
            exact = binomial.epsilon_for_delta(tokens * trials, p, 1e-5)
            composed = pld.composed_epsilon(trials, p, tokens, 1e-5)
            assert exact <= composed <= exact * 1.01 + 0.01


def test_gdp_closed_forms() -> None:
    # delta(0) of mu-GDP is 2*Phi(mu/2) - 1
    assert math.exp(gdp.log_delta_for_epsilon(1.0, 0.0)) == pytest.approx(2 * stats.norm.cdf(0.5) - 1, rel=1e-12)
    for mu in (0.5, 1.0, 8.0, 60.0, 480.0):
        eps = gdp.epsilon_for_delta(mu, 1e-5)
        assert math.isfinite(eps) and math.exp(gdp.log_delta_for_epsilon(mu, eps)) == pytest.approx(1e-5, rel=1e-8)
    assert gdp.clt_mu(4, 128, 0.05, paper_setting(5.0).scale) == pytest.approx(5.0, rel=1e-6)


def test_berry_esseen_gamma_bounds_the_actual_clt_error() -> None:
    for mu in (1.0, 60.0):
        trials, p = worst_case(paper_setting(mu))
        x = np.arange(trials + 1)
        sd = math.sqrt(trials * p * (1 - p))
        cdf = stats.binom.cdf(x, trials, p)
        normal = stats.norm.cdf((x - trials * p) / sd)
        normal_left = stats.norm.cdf((x + 1 - trials * p) / sd)  # the sup is attained just below each jump
        kolmogorov = max(np.abs(cdf - normal).max(), np.abs(cdf - normal_left).max())
        assert kolmogorov <= gdp.berry_esseen_gamma(trials, p)


def test_tradeoff_curve_is_symmetric_and_dominated_by_the_fitted_gdp() -> None:
    trials, p = worst_case(paper_setting(1.0))
    alpha = np.linspace(0, 1, 2001)
    f = binomial.tradeoff_curve(trials, p, alpha)
    assert np.allclose(binomial.tradeoff_curve(trials, p, f), alpha, atol=1e-9)  # f is its own inverse
    mu = binomial.fitted_gdp_mu(trials, p)
    gaussian = lambda m: stats.norm.cdf(stats.norm.isf(alpha) - m)  # noqa: E731
    assert np.all(f >= gaussian(mu) - 1e-12)
    assert np.any(f < gaussian(mu * 0.99))  # and it is tight
    assert mu == pytest.approx(1.0, rel=0.01)


def test_fitted_mu_stays_finite_in_the_loose_regime() -> None:
    trials, p = worst_case(paper_setting(60.0))
    assert 30 < binomial.fitted_gdp_mu(trials, p) < 80


def test_report_and_cli_json() -> None:
    result = CliRunner().invoke(
        cli, ["privacy", "--bits", "4", "--dim", "128", "--clip", "0.05", "--mu", "1", "--tokens", "64",
              "--delta", "1e-5", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    trials, p = worst_case(paper_setting(1.0))
    assert report["epsilon"] == pytest.approx(brute_force_epsilon([(64 * trials, p)], 1e-5), rel=1e-6)
    assert report["epsilon_per_token"] == pytest.approx(brute_force_epsilon([(trials, p)], 1e-5), rel=1e-6)
    assert report["mu_clt"] == pytest.approx(1.0, rel=1e-6) and 0 < report["gamma"] < 0.05
    assert report["A"] == pytest.approx(0.05 * math.sqrt(4 * 15 * 128 + 1), rel=1e-6)
    assert report["bits_sent"] == 4 * 128 * 64


def test_cli_rejects_bad_arguments() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["privacy", "--mu", "1", "--scale", "2"]).exit_code == 2
    bad_bits = runner.invoke(cli, ["privacy", "--mu", "1", "--bits", "9"])
    assert bad_bits.exit_code == 2 and "bits" in bad_bits.output


@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_log_sf_matches_scipy_at_every_threshold(n: int, p: float) -> None:
    for x in range(-1, n + 3):
        expected = stats.binom.logsf(x - 1, n, p) if x <= n else -math.inf
        assert binomial.log_sf(n, p, x) == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_log_sf_of_the_last_outcome_alone_far_in_the_tail() -> None:
    assert binomial.log_sf(1000, 0.3, 1000) == pytest.approx(1000 * math.log(0.3), rel=1e-12)  # sf underflows


def test_log_diff_of_equal_and_of_empty_terms() -> None:
    assert binomial._log_diff(-2.0, -2.0) == -math.inf
    assert binomial._log_diff(-2.0, -math.inf) == -2.0
    assert binomial._log_diff(-math.inf, -math.inf) == -math.inf


@pytest.mark.parametrize(("n", "p", "sds"), [(10**6, 0.5, -2.0), (10**6, 0.7, -0.5), (10**8, 0.5, 31.0)])
def test_log_sf_sums_long_tails_over_several_chunks(n: int, p: float, sds: float) -> None:
    """Below the mean the complement's lower tail, far above it the upper tail (sf < 1e-200) are summed in chunks of
    growing size: thousands of terms here, against scipy's incomplete beta or one long log-sum-exp (to 1e-8: the
    log-pmfs of n = 10^6 trials carry absolute errors near 1e-10)."""
    x = int(n * p + sds * math.sqrt(n * p * (1 - p)))
    if sds < 0:
        expected = stats.binom.logsf(x - 1, n, p)
    else:
        expected = special.logsumexp(stats.binom.logpmf(np.arange(x, x + 60_000), n, p))
        assert expected < math.log(1e-200)
    assert binomial.log_sf(n, p, x) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(("n", "p"), [(1, 0.8), (30, 0.95), (200, 0.7), (300, 0.55)])
def test_fitted_mu_matches_every_vertex_computed_from_its_smaller_tail(n: int, p: float) -> None:
    """max_x Phi^-1(1 - alpha_x) - Phi^-1(beta_x) with scipy's cdf/sf. At n = 200, p = 0.7 the vertex x = 1 has
    alpha = 1 - 0.7^200: taking Phi^-1 of alpha itself there claimed mu = 14.4 instead of 11.8."""
    x = np.arange(1, n + 1)

    def probit_of_cdf(q: float) -> np.ndarray:  # Phi^-1(P(Bin(n, q) <= x - 1)) from the smaller tail
        cdf, sf = stats.binom.cdf(x - 1, n, q), stats.binom.sf(x - 1, n, q)
        return np.where(cdf < sf, stats.norm.ppf(cdf), stats.norm.isf(sf))

    expected = np.max(probit_of_cdf(1 - p) - probit_of_cdf(p))  # 1 - alpha_x = P(Y <= x-1), beta_x = P(X <= x-1)
    assert binomial.fitted_gdp_mu(n, p) == pytest.approx(expected, rel=1e-9)


def test_exact_accounting_rejects_arguments_outside_its_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    for delta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="delta"):
            binomial.epsilon_for_delta(10, 0.7, delta)
        with pytest.raises(ValueError, match="delta"):
            gdp.epsilon_for_delta(1.0, delta)
    for p in (0.5, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\bp\b"):
            binomial.epsilon_for_delta(10, p, 1e-5)
    monkeypatch.setattr(binomial, "EXACT_CURVE_MAX_TRIALS", 10)
    assert len(binomial.tradeoff_vertices(10, 0.7)[0]) == 12
    with pytest.raises(ValueError, match="trials"):
        binomial.tradeoff_vertices(11, 0.7)


@pytest.mark.parametrize("delta", [0.3, 0.5, 0.6])
def test_small_and_zero_epsilon_of_randomized_response(delta: float) -> None:
    # N = 1, p = 0.75: eps(delta) = log((p - delta) / (1 - p)) for delta < 2p - 1 = 0.5, else 0.
    expected = math.log((0.75 - delta) / 0.25) if delta < 0.5 else 0.0
    assert binomial.epsilon_for_delta(1, 0.75, delta) == pytest.approx(expected, abs=1e-12)


def test_gdp_epsilon_below_one_and_zero() -> None:
    for mu, delta in ((0.1, 1e-3), (0.3, 0.05)):
        eps = gdp.epsilon_for_delta(mu, delta)
        assert 0 < eps < 1 and math.exp(gdp.log_delta_for_epsilon(mu, eps)) == pytest.approx(delta, rel=1e-8)
    assert gdp.epsilon_for_delta(1e-6, 1e-5) == 0.0  # delta(0) = 2 Phi(mu/2) - 1 is already below the target


def test_berry_esseen_gamma_and_clt_mu_closed_forms() -> None:
    trials, p = 100, 0.7
    third_moment = p * (1 - p) ** 3 + (1 - p) * p**3  # E|B - p|^3 of one Bernoulli(p) trial
    expected = gdp.BERRY_ESSEEN_CONSTANT * third_moment / ((p * (1 - p)) ** 1.5 * math.sqrt(trials))
    assert gdp.berry_esseen_gamma(trials, p) == pytest.approx(expected, rel=1e-12)
    assert gdp.clt_mu(4, 128, 0.05, 1.0, tokens=9) == pytest.approx(3 * gdp.clt_mu(4, 128, 0.05, 1.0), rel=1e-12)


@pytest.mark.parametrize(("trials", "p", "tokens"), [(4, 0.9, 1), (4, 0.9, 2), (30, 0.6, 2)])
def test_pld_of_few_trials_is_a_tight_upper_bound(trials: int, p: float, tokens: int) -> None:
    exact = binomial.epsilon_for_delta(tokens * trials, p, 1e-5)
    assert exact - 1e-9 <= pld.composed_epsilon(trials, p, tokens, 1e-5) <= exact * 1.01 + 0.01


def test_report_counts_tokens_and_scales_the_prompt_figures() -> None:
    params = paper_setting(1.0)
    trials, p = worst_case(params)
    single = privacy_report(params, public_tokens=3)
    assert (single.private_tokens, single.public_tokens) == (1, 3)
    assert single.epsilon == single.epsilon_per_token == binomial.epsilon_for_delta(trials, p, 1e-5)
    assert privacy_report(params).public_tokens == 0
    four = privacy_report(params, tokens=4)
    assert four.epsilon == pytest.approx(brute_force_epsilon([(4 * trials, p)], 1e-5), rel=1e-6)
    assert four.mu_clt_prompt == pytest.approx(2 * four.mu_clt) and four.mu_fitted_prompt == pytest.approx(
        2 * four.mu_fitted)
    assert four.gamma_prompt == pytest.approx(gdp.berry_esseen_gamma(4 * trials, p))
    none = privacy_report(params, tokens=0, public_tokens=5)
    assert (none.epsilon, none.gamma_prompt, none.mu_clt_prompt, none.bits_sent) == (0.0, 0.0, 0.0, 0)
    for tokens, public in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            privacy_report(params, tokens=tokens, public_tokens=public)


def test_groups_count_only_mechanisms_with_trials_sorted_by_p() -> None:
    from client_sdk.accounting import composition

    assert composition.as_groups({0.8: 5, 0.6: 3, 0.7: 0}) == ((0.6, 3), (0.8, 5))
    assert composition.fits((), 0.0, 1e-5) and not composition.fits((), -1e-9, 1e-5)  # nothing spent fits a zero cap


@pytest.mark.parametrize(("p", "epsilon"), [(0.9, 0.1), (0.75, 1.0), (0.6, 2.0), (0.55, 4.0)])
def test_max_trials_is_the_largest_count_within_the_cap(p: float, epsilon: float) -> None:
    """Against delta(epsilon) by brute force for every count up to one past the answer."""
    from client_sdk.accounting import composition

    def brute_delta(n: int) -> float:
        x = np.arange(n + 1)
        return float(np.maximum(stats.binom.pmf(x, n, p) - math.exp(epsilon) * stats.binom.pmf(x, n, 1 - p), 0).sum())

    largest = composition.max_trials(p, epsilon, 1e-5)
    assert all(brute_delta(n) <= 1e-5 for n in range(1, largest + 1)) and brute_delta(largest + 1) > 1e-5
    groups = composition.as_groups({p: largest})
    assert composition.fits(groups, epsilon, 1e-5) != composition.fits(composition.as_groups({p: largest + 1}),
                                                                        epsilon, 1e-5)
