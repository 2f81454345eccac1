"""bench.narrow's pieces on the tiny model (the real run is `python -m bench.narrow`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from app.reconstruction import pca_projection, publish
from bench import narrow
from bench.privacy_utility import Bench
from tests.conftest import tiny_runner
from tests.test_privacy_utility import PLAN, tiny_sample


def test_a_plan_without_a_beam_runs_only_the_per_token_attacks() -> None:
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    plan = dataclasses.replace(PLAN, corpora=("first",), beam=0, attack_segments=0)
    prior = np.random.default_rng(0).integers(3, len(table), size=500)
    bench = Bench(runner, [tiny_sample("first", 0, len(table))], publish(pca_projection(table, 8, 1.0), table), [],
                  None, 1.0, plan, prior, [])
    found = bench.del_attacks("first", 4, 10.0)["attacks"]
    assert set(found) == {"nearest-neighbour", "maximum-likelihood", "prior-ml"}


def test_the_table_has_a_row_per_projection_and_mu() -> None:
    config = {"mu_min": 5.0, "mu_max": 5.0, "noise_aware": True, "steps": 30}
    row = {"projection": "k8-mu5", "dim": 8, "mu": 5.0, "config": config, "perplexity": (50.0, 2.0),
           "retained_vs_mismatched": (0.01, 0.02), "retained_vs_nothing": (-0.2, 0.05),
           "strongest_attack": (0.03, 0.01, "prior-ml")}
    results = {"corpus": "austen-emma", "segments": 16, "floors": {"clean": {"perplexity": (40.0, 1.0)},
                                                                   "nothing": {"perplexity": (68.0, 2.0)}},
               "rows": [row, {**row, "mu": 10.0}]}
    lines = narrow.render(results).splitlines()
    assert [line.split("|")[5].strip() for line in lines[4:]] == ["5", "10"]
    assert "| k8-mu5 | 8 | 5 | 30 | 5 | 50.0 ± 2.0 | +0.010 ± 0.020 | -0.200 ± 0.050 | 0.030 ± 0.010 (prior-ml) |" in lines
