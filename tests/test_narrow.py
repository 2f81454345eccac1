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


def test_the_table_has_a_row_per_projection_and_level_from_the_saved_cells() -> None:
    nll = [3.0, 3.2]
    cell = {"nll": [4.0, 4.2], "nll_mismatched": [4.1, 4.3],
            "attacks": {"prior-ml": {"all": {"rate": 0.03, "se": 0.01}}, "nearest-neighbour": {"all": {"rate": 0.01, "se": 0.0}}}}
    results = {"corpus": "austen-emma", "plan": {"segments": 2},
               "projections": {"k8-mu5@abc": {"dim": 8, "config": {"mu_min": 5.0, "mu_max": 5.0, "noise_aware": True,
                                                                    "steps": 30}}},
               "cells": {"floor/clean": {"nll": nll}, "floor/nothing": {"nll": [5.0, 5.2]},
                         "k8-mu5@abc/n4/mu5": cell, "k8-mu5@abc/n4/mu10": cell}}
    lines = narrow.render(results).splitlines()
    assert [line.split("|")[5].strip() for line in lines[4:]] == ["5", "10"]
    assert lines[4].startswith("| k8-mu5 | 8 | 5 | 30 | 5 | ")
    assert "| +0.091 ± " in lines[4] and "| +0.500 ± " in lines[4] and "0.030 ± 0.010 (prior-ml) |" in lines[4]
