"""The privacy-utility benchmark's pieces and its plumbing, on the tiny model (the real run is `veil bench`)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from app.reconstruction import pca_projection
from app.soft_prompts import SoftPrompt
from bench import privacy_utility
from bench.attacks import calibrate_mu, language_model_attack, recovery_rate
from client_sdk import wire
from bench.pipeline import PREFIX
from bench.privacy_utility import Bench, Plan, run
from bench.privacy_utility_report import ROW_NAMES, render
from client_sdk.accounting import gdp
from client_sdk.mechanism import MechanismParams, quantize, secure_rng
from tests.conftest import tiny_runner

PLAN = Plan(segments=3, mus=(0.5, 2000.0), bits=(2,), new_tokens=3, audit_samples=4000, search_steps=3)


def test_calibrate_mu_brackets_the_target_of_a_known_curve() -> None:
    found = calibrate_mu(lambda mu: mu / (1 + mu), 0.5, 0.01, 100.0, steps=12)  # reaches 0.5 at mu = 1
    assert found["low"] < 1.0 <= found["high"] == found["mu"]
    assert found["high"] / found["low"] < 1.01
    assert found["success"] >= 0.5


def test_calibrate_mu_reports_targets_out_of_reach() -> None:
    assert calibrate_mu(lambda mu: 0.01, 0.1, 0.1, 1000.0, steps=5)["mu"] is None
    assert calibrate_mu(lambda mu: 0.5, 0.1, 0.1, 1000.0, steps=5)["mu"] == 0.1


def test_the_language_model_attack_reads_loose_payloads_and_falls_back_to_its_prior() -> None:
    runner = tiny_runner()
    table = np.random.default_rng(0).uniform(-1, 1, size=(runner.model.config.vocab_size, 8))
    truth = np.random.default_rng(1).integers(3, len(table), size=(4, 10))
    loose = MechanismParams.from_mu(5000.0, bits=4, dim=8, clip=1.0)
    levels = quantize(table[truth], loose, secure_rng(0))
    assert recovery_rate(language_model_attack(levels, table, loose, runner.model, 1), truth) > 0.95
    prior = language_model_attack(levels, table, loose, runner.model, 1, prior_only=True)
    assert (prior == prior[0]).all()  # no payload: every prompt gets the same guesses


def hashed_words(texts: list[str]) -> np.ndarray:
    """A stand-in sentence encoder: unit-norm bags of hashed words."""
    vectors = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        for word in text.split():
            vectors[row, zlib.crc32(word.encode()) % 64] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def bench() -> Bench:
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    ids = torch.randint(3, len(table), (PLAN.segments, 2 * PREFIX), generator=torch.Generator().manual_seed(0))
    projections = {"PCA": pca_projection(table, 8, 1.0), "trained": pca_projection(table, 8, 1.0)}
    soft_prompt = SoftPrompt("tiny-sp", "", 2, 1.0, torch.randn(4, table.shape[1]))
    bench = Bench(runner, ids[:, :PREFIX], ids[:, PREFIX:], projections, [soft_prompt], hashed_words, 1.0, PLAN)
    soft_prompt.projection_id = bench.published["trained"].id
    return bench


@pytest.fixture(scope="module")
def saved(bench: Bench, tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("privacy-utility") / "run.json"
    return path, run(bench, path)


def test_a_run_measures_every_cell_and_resumes_without_recomputing(bench: Bench, saved, monkeypatch) -> None:
    path, results = saved
    cells = results["cells"]
    assert set(cells) == {key for key, _ in privacy_utility.cells(bench)}

    strict, loose = cells["del-trained/n2/mu0.5"], cells["del-trained/n2/mu2000"]
    assert strict["attacks"]["maximum-likelihood"] < 0.5 < loose["attacks"]["maximum-likelihood"]
    assert cells["gaussian/n2/mu2000"]["epsilon_per_token"] == pytest.approx(gdp.epsilon_for_delta(2000.0, 1e-5))
    assert strict["epsilon_per_token"] < strict["epsilon_prompt"]
    assert cells["del-trained-sp/n2/mu0.5"]["soft_prompt"] == "tiny-sp"
    assert cells["del-trained-sp/n2/mu0.5"]["soft_prompt_exact"] is False
    for mu in PLAN.mus:
        audit = cells[f"audit/n2/mu{mu:g}"]
        assert audit["epsilon_lower"] <= audit["epsilon_accountant"]
    assert results["communication"]["bits"]["2"]["payload_bytes"] == wire.payload_size(PREFIX, 8, 2)

    markdown = render(results)
    assert all(name in markdown for name in ROW_NAMES.values())
    assert "clean prefix (no privacy) | " + f"{math.exp(cells['clean']['nll']):.1f} | +1.00" in markdown

    def fail(*args: object) -> dict:
        raise AssertionError("a saved cell was computed again")

    monkeypatch.setattr(Bench, "private_row", fail)
    monkeypatch.setattr(Bench, "floor", fail)
    assert run(bench, path)["cells"] == cells


def test_a_saved_run_of_another_plan_is_not_mixed_in(bench: Bench, tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_text('{"plan": {"segments": 99}, "cells": {}}')
    with pytest.raises(SystemExit, match="--fresh"):
        run(bench, path)


def test_the_plots_are_written(saved, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from bench.privacy_utility_report import plot

    assert all(path.stat().st_size > 10_000 for path in plot(saved[1], tmp_path, "tiny"))


def test_veil_bench_runs_the_hyphenated_benchmark() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "dp-soft-prompt", "--", "--help"])  # not imported by the tests
    assert result.exit_code == 0 and "--epsilons" in result.output
