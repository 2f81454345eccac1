"""bench.gist's pieces on the tiny model (the real run is `python -m bench.gist`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.stats import binom

from app.reconstruction import pca_projection, publish
from app.training.data import HELD_OUT_NOVEL
from bench import gist
from bench.pipeline import send
from bench.privacy_utility import Bench
from tests.conftest import tiny_runner
from tests.test_privacy_utility import PLAN, tiny_sample

MU = 3.0


def tiny_bench() -> Bench:
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    plan = dataclasses.replace(PLAN, corpora=(HELD_OUT_NOVEL,), beam=0, attack_segments=0)
    prior = np.random.default_rng(0).integers(3, len(table), size=500)
    return Bench(runner, [tiny_sample(HELD_OUT_NOVEL, 0, len(table))], publish(pca_projection(table, 8, 1.0), table),
                 [], None, 1.0, plan, prior, [])


def test_posterior_means_match_a_binomial_posterior_computed_directly() -> None:
    bench = tiny_bench()
    reader = gist.GistReader(bench, span=4)
    ids = bench.samples[HELD_OUT_NOVEL].prefix_ids[:1, :8]
    params = bench.params(gist.BITS, MU)
    levels = send(bench.client_table, ids, params, seed=1)
    v = np.clip(bench.client_table.astype(np.float64), -params.clip, params.clip)
    p = (params.scale + v) / (2 * params.scale)
    for t in range(levels.shape[1]):
        log_post = binom.logpmf(levels[0, t][None], params.levels, p).sum(axis=1) + bench.log_prior
        post = np.exp(log_post - log_post.max())
        expected = (post / post.sum()) @ bench.table.double().numpy()
        np.testing.assert_allclose(reader.posterior_means(levels, MU)[0, t].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pooling_averages_consecutive_spans() -> None:
    bench = tiny_bench()
    reader = gist.GistReader(bench, span=4)
    levels = send(bench.client_table, bench.samples[HELD_OUT_NOVEL].prefix_ids[:2], bench.params(gist.BITS, MU), 2)
    means, pooled = reader.posterior_means(levels, MU), reader.pooled(levels, MU)
    assert pooled.shape == (2, means.shape[1] // 4, means.shape[2])
    torch.testing.assert_close(pooled[1, 2], means[1, 8:12].mean(dim=0))


def test_the_adapter_starts_as_a_constant_prefix_and_training_makes_it_read_the_gist() -> None:
    bench = tiny_bench()
    reader = gist.GistReader(bench, span=4)
    segments = torch.cat([bench.samples[HELD_OUT_NOVEL].prefix_ids,
                          bench.samples[HELD_OUT_NOVEL].continuations[:, :gist.TRAIN_CONTINUATION]], dim=1)
    adapter, losses = gist.train_adapter(bench, reader, segments, [MU], steps=0, batch=2)
    pooled = torch.randn(3, *adapter.slots.shape)
    with torch.no_grad():
        assert torch.equal(adapter(pooled)[0], adapter(pooled)[1])
    adapter, losses = gist.train_adapter(bench, reader, segments, [MU], steps=3, batch=2)
    assert len(losses) == 3 and all(np.isfinite(losses))
    with torch.no_grad():
        assert not torch.allclose(adapter(pooled)[0], adapter(pooled)[1])
