"""Token-recovery attacks, the bootstrap and the empirical audit, on random tables, the tiny model and the client's
real quantizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.attacks import (
    beam_search,
    calibrate_mu,
    forcing_known,
    gaussian_log_likelihoods,
    likelihood_terms,
    log_likelihoods,
    map_tokens,
    maximum_likelihood,
    most_frequent,
    nearest_neighbour,
    recovery,
    recovery_rate,
    unigram_log_prior,
)
from bench.audit import audit_epsilon, clopper_pearson_upper
from bench.bootstrap import bootstrap_se, within
from client_sdk.accounting import privacy_report
from client_sdk.mechanism import MechanismParams, dequantize, quantize, secure_rng
from tests.conftest import tiny_runner

VOCAB, DIM, CLIP = 500, 16, 1.0


def attack_rates(mu: float, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    table = np.clip(rng.normal(size=(VOCAB, DIM)), -CLIP, CLIP)
    tokens = rng.integers(VOCAB, size=2000)
    params = MechanismParams.from_mu(mu, bits=4, dim=DIM, clip=CLIP)
    levels = quantize(table[tokens], params, rng)
    return (recovery_rate(nearest_neighbour(dequantize(levels, params), table), tokens),
            recovery_rate(maximum_likelihood(levels, table, params), tokens))


def chance_bound(tokens: int = 2000, sigmas: float = 4.0) -> float:
    """Chance (1/VOCAB) plus `sigmas` binomial standard errors over `tokens` guesses."""
    chance = 1 / VOCAB
    return chance + sigmas * math.sqrt(chance * (1 - chance) / tokens)


def test_attacks_recover_everything_when_loose_and_nothing_when_strict() -> None:
    assert min(attack_rates(1000.0)) > 0.99
    assert max(attack_rates(0.05)) < chance_bound()  # no better than chance, within 4 standard errors


def test_the_likelihood_attack_is_at_least_as_strong_as_nearest_neighbour() -> None:
    nn, ml = attack_rates(15.0)
    assert nn > chance_bound()  # nearest neighbour reads something at this mu
    assert ml >= nn  # and the Bayes-optimal guess (uniform prior) reads at least as much


def test_a_point_mass_prior_decides_the_guess_and_a_flat_one_changes_nothing() -> None:
    rng = np.random.default_rng(1)
    table = rng.uniform(-CLIP, CLIP, size=(VOCAB, DIM))
    params = MechanismParams.from_mu(3.0, bits=4, dim=DIM, clip=CLIP)
    levels = quantize(table[rng.integers(VOCAB, size=300)], params, rng)
    point = np.full(VOCAB, -1e9)
    point[7] = 0.0
    assert (maximum_likelihood(levels, table, params, point) == 7).all()
    flat = np.full(VOCAB, np.log(1 / VOCAB))
    assert (maximum_likelihood(levels, table, params, flat) == maximum_likelihood(levels, table, params)).all()


def test_the_unigram_prior_recovers_more_when_the_text_follows_it() -> None:
    """Skewed text (Zipf): the prior-aware guess beats the uniform one at a noise level where both are uncertain."""
    rng = np.random.default_rng(2)
    table = rng.uniform(-CLIP, CLIP, size=(VOCAB, DIM))
    weights = 1 / np.arange(1, VOCAB + 1)
    public, private = (rng.choice(VOCAB, size=n, p=weights / weights.sum()) for n in (50_000, 3000))
    prior = unigram_log_prior(public, VOCAB)
    assert np.exp(prior).sum() == pytest.approx(1.0)
    params = MechanismParams.from_mu(4.0, bits=4, dim=DIM, clip=CLIP)
    levels = quantize(table[private], params, rng)
    uniform = recovery_rate(maximum_likelihood(levels, table, params), private)
    aware = recovery_rate(maximum_likelihood(levels, table, params, prior), private)
    assert aware > uniform + 0.05
    assert most_frequent(public, 3).tolist() == [0, 1, 2]


def test_the_gaussian_likelihood_guess_is_nearest_neighbour_in_the_table() -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(size=(VOCAB, DIM))
    received = table[rng.integers(VOCAB, size=200)] + rng.normal(scale=0.8, size=(200, DIM))
    guesses = map_tokens(lambda chunk: gaussian_log_likelihoods(received[chunk], table, 0.8), len(received))
    assert (guesses == nearest_neighbour(received, table)).all()


def test_recovery_counts_subsets_and_its_se_is_the_bootstrap_of_a_ratio() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    guesses = np.array([[1, 0, 3, 0], [5, 6, 7, 0]])
    content = np.array([[True, True, False, False], [True, True, True, True]])
    found = recovery(guesses, truth, {"all": np.ones_like(truth, dtype=bool), "content": content,
                                      "none": np.zeros_like(content)})
    assert found["all"]["rate"] == 5 / 8 and found["content"]["rate"] == pytest.approx(4 / 6)
    assert found["none"]["rate"] is None and found["all"]["se"] > 0


def tiny_setup(steps: int = 6, batch: int = 3):
    runner = tiny_runner()
    vocab = runner.model.config.vocab_size
    table = np.random.default_rng(0).uniform(-1, 1, size=(vocab, 8))
    truth = np.random.default_rng(1).integers(3, vocab, size=(batch, steps))
    return runner.model, table, truth


def greedy(model, step_scores, batch: int, steps: int, start_id: int) -> np.ndarray:
    """Greedy MAP decoding, recomputing each prefix from scratch (an independent computation of beam 1)."""
    ids = torch.full((batch, 1), start_id)
    with torch.inference_mode():
        for t in range(steps):
            prior = torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), dim=-1).numpy()
            ids = torch.cat([ids, torch.from_numpy(np.argmax(prior + step_scores(t), axis=1))[:, None]], dim=1)
    return ids[:, 1:].numpy()


def sequence_score(model, step_scores, ids: np.ndarray, start_id: int) -> np.ndarray:
    full = torch.cat([torch.full((len(ids), 1), start_id), torch.from_numpy(ids)], dim=1)
    with torch.inference_mode():
        prior = torch.log_softmax(model(input_ids=full).logits[:, :-1].double(), dim=-1).numpy()
    rows = np.arange(len(ids))
    return sum(prior[rows, t, ids[:, t]] + step_scores(t)[rows, ids[:, t]] for t in range(ids.shape[1]))


def test_beam_one_is_greedy_and_a_wider_beam_scores_at_least_as_well() -> None:
    model, table, truth = tiny_setup()
    params = MechanismParams.from_mu(3.0, bits=4, dim=8, clip=1.0)
    levels = quantize(table[truth], params, secure_rng(0))
    terms = likelihood_terms(table, params)
    step = lambda t: log_likelihoods(levels[:, t], terms)  # noqa: E731
    one = beam_search(step, len(truth), truth.shape[1], model, 1, beam=1)
    assert (one == greedy(model, step, len(truth), truth.shape[1], 1)).all()
    wide = beam_search(step, len(truth), truth.shape[1], model, 1, beam=5)
    assert (sequence_score(model, step, wide, 1) >= sequence_score(model, step, one, 1) - 1e-9).all()


def test_beam_search_reads_loose_payloads_and_keeps_known_tokens() -> None:
    model, table, truth = tiny_setup(steps=10, batch=4)
    loose = MechanismParams.from_mu(5000.0, bits=4, dim=8, clip=1.0)
    levels = quantize(table[truth], loose, secure_rng(0))
    terms = likelihood_terms(table, loose)
    step = lambda t: log_likelihoods(levels[:, t], terms)  # noqa: E731
    assert recovery_rate(beam_search(step, 4, 10, model, 1, beam=3), truth) > 0.95
    nothing = np.zeros((4, len(table)))
    private = np.zeros_like(truth, dtype=bool)
    private[:, 5] = True
    known = beam_search(forcing_known(lambda t: nothing, truth, private), 4, 10, model, 1, beam=3)
    assert (known[~private] == truth[~private]).all()


def test_calibrate_mu_brackets_and_interpolates_the_target_of_a_known_curve() -> None:
    curve = lambda mu: mu / (1 + mu)  # noqa: E731  reaches 0.5 at mu = 1
    found = calibrate_mu(curve, 0.5, [0.1, 0.3, 3.0, 30.0], steps=8)
    assert found["low"] < 1.0 <= found["high"]
    assert found["mu"] == pytest.approx(1.0, rel=0.02)
    assert calibrate_mu(lambda mu: 0.01, 0.1, [0.1, 1000.0], steps=5)["mu"] is None
    assert calibrate_mu(lambda mu: 0.5, 0.1, [0.1, 1000.0], steps=5)["mu"] == 0.1


def test_the_bootstrap_se_of_a_mean_matches_the_closed_form() -> None:
    values = np.random.default_rng(4).normal(size=40)
    plug_in = values.std(ddof=0) / np.sqrt(len(values))  # the bootstrap estimates the plug-in SE
    assert bootstrap_se(lambda m: m, values, replicates=20_000) == pytest.approx(plug_in, rel=0.03)


def test_a_paired_bootstrap_cancels_what_the_rows_share() -> None:
    rng = np.random.default_rng(5)
    shared = rng.normal(scale=5.0, size=60)
    a, b = shared + rng.normal(scale=0.1, size=60), shared + rng.normal(scale=0.1, size=60)
    paired = bootstrap_se(lambda x, y: x - y, a, b)
    assert paired == pytest.approx(np.std(a - b) / np.sqrt(60), rel=0.1)
    assert paired < 0.1 * bootstrap_se(lambda m: m, a)
    assert within(0.1, 0.06) and not within(0.2, 0.06)


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
    # sigma = 2C / mu; a sample std over N draws has relative standard error 1/sqrt(2N): allow 4 of them
    assert noisy.std() == pytest.approx(2 * 1.5 / 2.0, rel=4 / math.sqrt(2 * noisy.size))
    assert len(np.unique(quantize_uniform(noisy, 2, 3.0))) == 4
