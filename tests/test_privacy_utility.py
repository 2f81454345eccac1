"""The privacy-utility benchmark's pieces and its plumbing, on the tiny model (the real run is `veil bench`)."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest
import torch

from app.reconstruction import pca_projection, publish
from app.soft_prompts import SoftPrompt
from app.training.data import DataError
from bench import privacy_utility
from bench.pipeline import PREFIX, Sample, load_sample, name_characters, segment_nlls
from bench.privacy_utility import Bench, Plan, degenerate, operating_point, run
from bench.privacy_utility_report import ROWS, ceiling, render, retained
from tests.conftest import tiny_runner

PLAN = Plan(corpora=("first", "second"), segments=3, attack_segments=2, levels=((4, 0.5), (4, 2000.0), (2, 2000.0)),
            beam=2, chat_prompts=2, chat_tokens=3, audit_samples=4000, search_steps=1, targets=(0.5,))


def hashed_words(texts: list[str]) -> np.ndarray:
    """A stand-in sentence encoder: unit-norm bags of hashed words."""
    vectors = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        for word in text.split() or [""]:
            vectors[row, zlib.crc32(word.encode()) % 64] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def tiny_sample(name: str, seed: int, vocab: int) -> Sample:
    ids = torch.randint(3, vocab, (PLAN.segments, 2 * PREFIX), generator=torch.Generator().manual_seed(seed))
    private = np.zeros((PLAN.segments, PREFIX), dtype=bool)
    private[:, 5:8] = True
    private[:, 20] = True
    return Sample(name, "0" * 64, ids[:, :PREFIX], ids[:, PREFIX:], private)


@pytest.fixture(scope="module")
def bench() -> Bench:
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    samples = [tiny_sample("first", 0, len(table)), tiny_sample("second", 1, len(table))]
    soft_prompt = SoftPrompt("tiny-sp", "", 4, 0.5, torch.randn(4, table.shape[1]))
    distilled = SoftPrompt("tiny-distilled", "", 4, 2000.0, torch.randn(2, table.shape[1]))
    prior = np.random.default_rng(0).integers(3, len(table), size=500)
    bench = Bench(runner, samples, publish(pca_projection(table, 8, 1.0), table), [soft_prompt, distilled], hashed_words, 1.0,
                  PLAN, prior, ["what is the capital of france ?", "hello world"])
    soft_prompt.projection_id = distilled.projection_id = bench.published.id
    return bench


@pytest.fixture(scope="module")
def saved(bench: Bench, tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("privacy-utility") / "run.json"
    return path, run(bench, path)


def test_a_run_measures_every_cell_and_resumes_without_recomputing(bench: Bench, saved, monkeypatch) -> None:
    path, results = saved
    cells = results["cells"]
    operating = results["operating_mu"]
    expected = {key for key, _ in privacy_utility.first_cells(bench) + privacy_utility.later_cells(bench, operating)}
    assert set(cells) == expected
    assert "second/selective/n4/mu0.5" in cells and "first/del/n4/mu4" in cells  # the SDK's default mu too
    assert cells["first/del-sp/n4/mu2000"]["soft_prompt"] == "tiny-distilled"
    assert {"chat/del/n2/mu2000", "chat/del-sp/n4/mu2000"} <= set(cells) and "chat/del-sp/n2/mu2000" not in cells
    strict, loose = (cells[f"first/attacks/del/n4/mu{mu}"]["attacks"]["maximum-likelihood"]["all"]["rate"]
                     for mu in ("0.5", "2000"))
    assert strict < 0.5 < loose
    assert cells["first/del-sp/n4/mu0.5"]["soft_prompt"] == "tiny-sp"
    assert cells["first/del-sp/n4/mu0.5"]["soft_prompt_exact"] is True
    assert cells["first/del-sp/n2/mu2000"]["soft_prompt"] is None  # no n=2 prompt: the row says so
    for key in (k for k in cells if k.startswith("audit/")):
        assert cells[key]["epsilon_lower"] <= cells[key]["epsilon_accountant"]
    assert {"coh", "coh_se", "clean_share"} <= set(cells["chat/blank"])
    assert results["corpora"]["first"]["private_share"] == pytest.approx(4 / PREFIX)

    markdown = render(results)
    assert all(label in markdown for label in ROWS.values())
    assert "Calibrating mu" in markdown and "### first" in markdown and "### second" in markdown

    def fail(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a saved cell was computed again")

    for method in ("row", "floor", "del_attacks", "gaussian_attacks", "chat", "calibrate", "audit", "prior_alone"):
        monkeypatch.setattr(Bench, method, fail)
    assert run(bench, path)["cells"].keys() == cells.keys()


def test_the_mismatched_control_scores_each_continuation_after_the_previous_segments_payload(bench: Bench,
                                                                                             saved) -> None:
    cell = saved[1]["cells"]["first/del/n4/mu0.5"]
    sample = bench.samples["first"]
    prefix = bench.del_prefix(sample, 4, 0.5)
    for i in range(len(prefix)):  # one segment at a time: an independent computation of the pairing
        alone = segment_nlls(bench.model, prefix[i - 1 : i] if i else prefix[-1:], sample.continuations[i : i + 1])
        assert cell["nll_mismatched"][i] == pytest.approx(float(alone[0]), rel=1e-5)
        own = segment_nlls(bench.model, prefix[i : i + 1], sample.continuations[i : i + 1])
        assert cell["nll"][i] == pytest.approx(float(own[0]), rel=1e-5)


def test_selective_privacy_noises_only_the_private_spans_and_the_placeholder_replaces_them(bench: Bench) -> None:
    sample = bench.samples["first"]
    selective = bench.selective_prefix(sample, 4, 0.5)
    clean = bench.table[sample.prefix_ids]
    public = torch.from_numpy(~sample.private)
    assert torch.equal(selective[public], clean[public])
    assert not torch.allclose(selective[~public], clean[~public])
    prefixes = bench.placeholder_prefixes(sample)
    placeholder = bench.runner.tokenizer(privacy_utility.PLACEHOLDER, add_special_tokens=False)["input_ids"]
    assert [len(p) for p in prefixes] == [PREFIX - 4 + 2 * len(placeholder)] * PLAN.segments  # two runs of spans


def test_retained_and_its_se_against_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    clean, reference = rng.normal(3.0, 0.3, 50), rng.normal(4.0, 0.3, 50)
    row = 0.5 * clean + 0.5 * reference + rng.normal(0, 0.01, 50)
    value, se = retained(row.tolist(), reference.tolist(), clean.tolist())
    assert value == pytest.approx((reference.mean() - row.mean()) / (reference.mean() - clean.mean()))
    indices = np.random.default_rng(1).integers(50, size=(3000, 50))
    replicates = [(reference[i].mean() - row[i].mean()) / (reference[i].mean() - clean[i].mean()) for i in indices]
    assert se == pytest.approx(np.std(replicates), rel=0.15)
    assert ceiling(1e-6, 72, 4.0, 3.0) == pytest.approx(0.0, abs=1e-9)
    assert ceiling(1e6, 72, 4.0, 3.0) == 1.0


def test_the_operating_point_record_has_the_schema_other_tools_read(saved) -> None:
    results = {**saved[1], "cells": dict(saved[1]["cells"])}
    found = results["cells"]["calibrate/n4/0.5"]
    assert found["corpus"] == "first" and operating_point(results, "cmd") is None  # only from WikiText-2 test
    results["cells"]["calibrate/n4/0.05"] = {**found, "corpus": "wikitext-2-test", "mu": 7.0}
    record = operating_point(results, "cmd")
    assert set(record) == {"bits", "dim", "mu", "epsilon_per_token", "attack", "recovery", "recovery_content",
                           "target", "corpus", "command"}
    assert record["target"] == 0.05 and record["mu"] == 7.0 and record["attack"] in found["attacks"]


def test_the_plots_are_written(saved, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from bench.privacy_utility_report import plot

    assert all(path.stat().st_size > 10_000 for path in plot(saved[1], tmp_path, "tiny"))


def test_any_text_file_is_a_corpus_with_its_hash_and_private_spans(tmp_path) -> None:
    text = "the capital of france is paris . " * 30
    path = tmp_path / "mine.txt"
    path.write_text(text)
    sample = load_sample(tiny_runner().tokenizer, str(path), tmp_path, 2)
    assert sample.corpus == "mine" and sample.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert sample.prefix_ids.shape == (1, PREFIX) and not sample.private.any()
    with pytest.raises(DataError, match="neither"):
        load_sample(tiny_runner().tokenizer, str(tmp_path / "absent.txt"), tmp_path, 2)


def test_private_spans_are_names_not_sentence_starts_or_titles() -> None:
    text = "Then Emma Woodhouse met Mr. Knightley in Highbury. The end. I said \"Yes\" to Harriet's plan."
    mask = name_characters(text)
    marked = {text[m.start() : m.end()] for m in __import__("re").finditer(r"\w+(?:'\w+)?", text) if mask[m.start()]}
    assert marked == {"Emma", "Woodhouse", "Knightley", "Highbury", "Harriet's"}


def test_degenerate_answers_are_unk_or_loops() -> None:
    assert degenerate("a <unk> b") and degenerate("go on and go on and go on and")
    assert not degenerate("Paris is the capital of France.")


def test_veil_bench_runs_the_hyphenated_benchmark() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    for args in (["dp-soft-prompt", "--help"], ["dp-soft-prompt", "--", "--help"]):  # the benchmark's own options
        result = CliRunner().invoke(cli, ["bench", *args])
        assert result.exit_code == 0 and "--epsilons" in result.output, args
    listed = CliRunner().invoke(cli, ["bench", "--help"])
    assert listed.exit_code == 0 and "distill-lora" in listed.output


def test_deferred_cells_wait_for_a_later_run_and_redone_cells_are_computed_again(bench: Bench, saved, tmp_path,
                                                                                  monkeypatch) -> None:
    path = tmp_path / "run.json"
    path.write_text(saved[0].read_text())
    calls: list[tuple] = []
    monkeypatch.setattr(Bench, "row", lambda self, *args: calls.append(args) or {"nll": [0.0]})
    redone = run(bench, path, redo=("*/del-sp/*",), defer=("second/*",))
    first = {k for k in saved[1]["cells"] if k.startswith("first/del-sp/")}
    assert {f"first/del-sp/{privacy_utility.level_key(n, mu)}" for _, _, n, mu in calls} == first
    assert {c[:2] for c in calls} == {("first", "del-sp")}
    assert not any(k.startswith("second/del-sp/") for k in redone["cells"])  # dropped, deferred
    assert all(redone["cells"][k] == {"nll": [0.0], "seconds": redone["cells"][k]["seconds"]}
               for k in redone["cells"] if k.startswith("first/del-sp/"))
    calls.clear()
    again = run(bench, path)
    assert {c[0] for c in calls} == {"second"} and {c[1] for c in calls} == {"del-sp"}
    assert set(again["cells"]) == set(saved[1]["cells"])
