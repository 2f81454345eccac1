"""Distillation, synthesized chat data and the never-worse-than-nothing check, on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.artifacts import manifests, read_manifest, set_active
from app.reconstruction import pca_projection
from app.soft_prompts import load_soft_prompts, record_floor_check, save_soft_prompt
from app.training.data import CORPORA
from app.training.distill import distillation_kl
from app.training.evaluate import PAD, answer_mask, continuation_loss
from app.training.floor import context_retained, floor_check, floor_report
from app.training.soft_prompt import SoftPromptConfig, private_prefix_loss
from app.training.synth import farthest_first, loops, prompt_ids, synthesize_chat
from tests.conftest import tiny_runner
from tests.test_training import SHAPE, corpus


def ids(runner, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, len(runner.tokenizer), (batch, length), generator=torch.Generator().manual_seed(seed))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_kl_is_zero_when_the_private_path_is_the_clean_one(runner) -> None:
    prefix = runner.input_embeddings[ids(runner, 3, 6, 0)].detach()
    kl = distillation_kl(runner.model, prefix, prefix, ids(runner, 3, 5, 1))
    assert kl.shape == (3,) and torch.allclose(kl, torch.zeros(3), atol=1e-6)


def test_kl_matches_an_independent_computation_from_token_ids(runner) -> None:
    teacher_ids, student_ids, continuation = ids(runner, 2, 6, 0), ids(runner, 2, 4, 1), ids(runner, 2, 5, 2)
    table = runner.input_embeddings.detach()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    kl = distillation_kl(runner.model, table[teacher_ids], table[student_ids], continuation, mask)
    with torch.no_grad():  # the ordinary input_ids forward, logits at the positions that predict the continuation
        p = runner.model(input_ids=torch.cat([teacher_ids, continuation], 1)).logits[:, 5:-1].double().numpy()
        q = runner.model(input_ids=torch.cat([student_ids, continuation], 1)).logits[:, 3:-1].double().numpy()
    lp, lq = log_softmax(p), log_softmax(q)
    per_position = (np.exp(lp) * (lp - lq)).sum(-1)  # KL = cross-entropy - entropy, position by position
    expected = [per_position[0].mean(), per_position[1, :2].mean()]
    assert np.allclose(kl.detach().numpy(), expected, atol=1e-5) and min(expected) > 0


def test_distillation_trains_only_the_soft_prompt(runner) -> None:
    runner.model.requires_grad_(False)
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    config = SoftPromptConfig(name="d", projection_id="0123456789abcdef", mu=20.0, virtual_tokens=3,
                              objective="distill", **SHAPE)
    prompt = torch.randn(3, 32, requires_grad=True)
    loss = private_prefix_loss(runner, projection, config, prompt, "distill")(ids(runner, 4, 16, 0),
                                                                               torch.Generator().manual_seed(0))
    loss.backward()
    assert loss > 0 and prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in runner.model.parameters())


def test_answer_mask_scores_up_to_the_first_end_of_turn_and_never_padding() -> None:
    continuation = torch.tensor([[5, 6, 7, 8], [5, 2, PAD, PAD], [2, 5, 2, 6]])
    assert answer_mask(continuation, 2).tolist() == [[True] * 4, [True, True, False, False],
                                                     [True, False, False, False]]


def test_chat_padding_is_not_scored(runner) -> None:
    prefix = runner.input_embeddings[ids(runner, 1, 4, 0)].detach()
    answer = torch.tensor([[5, 6, 2, PAD, PAD]])
    loss = continuation_loss(runner.model, prefix, answer.clamp(min=0), answer_mask(answer, 2))
    assert torch.allclose(loss, continuation_loss(runner.model, prefix, answer[:, :3]))


def test_training_text_must_not_contain_the_held_out_novel() -> None:
    for data in ("austen", "austen-emma"):
        with pytest.raises(ValueError, match="held-out"):
            SoftPromptConfig(name="x", projection_id="0123456789abcdef", mu=10, data=data)
    assert "austen/emma.txt" not in CORPORA["general"] and len(CORPORA["general"]) == 5


def test_floor_report_against_closed_forms() -> None:
    nll = {"clean prefix": np.array([2.0, 2.0]), "nothing sent": np.array([4.0, 4.0]),
           "soft prompt alone": np.array([5.0, 5.0]), "private path": np.array([3.0, 3.4]),
           "mismatched control": np.array([3.8, 3.8])}
    report = floor_report(nll, "held")
    assert report["passes"] and math.isclose(report["context_retained"], (3.8 - 3.2) / (3.8 - 2.0))
    assert math.isclose(report["perplexity"]["private path"], math.exp(3.2))
    assert report["context_retained_se"] > 0
    worse = floor_report({**nll, "private path": np.array([4.5, 4.5])}, "held")
    assert not worse["passes"] and "worse than sending nothing" in worse["reason"]
    assert context_retained({**nll, "private path": nll["mismatched control"]}) == 0


def test_a_prompt_worse_than_nothing_is_deactivated_and_not_served(tmp_path: Path) -> None:
    runner = tiny_runner()
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    bad = torch.randn(4, 32) * 50  # a soft prompt that drowns everything after it
    check = floor_check(runner, projection, 4, 20.0, bad, corpus(), "tiny", prefix_tokens=8, continuation_tokens=8,
                        segments=8)
    assert set(check["perplexity"]) == {"clean prefix", "nothing sent", "soft prompt alone", "private path",
                                        "mismatched control"}
    assert not check["passes"]
    manifest = {"kind": "soft_prompt", "model_id": "tiny-llama", "base_model_sha256": runner.fingerprint,
                "projection_id": "0123456789abcdef", "bits": 4, "mu": 20.0, "active": True}
    save_soft_prompt(bad, tmp_path / "bad", manifest, runner)
    assert len(load_soft_prompts(tmp_path, runner)[0]) == 1
    record_floor_check(tmp_path / "bad", check)
    recorded = read_manifest(tmp_path / "bad")
    assert not recorded["active"] and recorded["inactive_reason"] == check["reason"]
    set_active(tmp_path / "bad", True)  # activated by hand: still not served by default
    served, skipped = load_soft_prompts(tmp_path, runner)
    assert served == [] and skipped["bad"].startswith("below the floor")
    assert len(load_soft_prompts(tmp_path, runner, serve_below_floor=True)[0]) == 1


def test_synthesized_chat_examples_are_shaped_deterministic_and_cached(tmp_path: Path, monkeypatch) -> None:
    runner = tiny_runner()
    prompt = prompt_ids(runner, "what is the capital ?", list(range(5, 15)) * 3, 16)
    assert len(prompt) == 16 and prompt[-3:] == runner.tokenizer("<|im_end|> <|im_start|> assistant")["input_ids"]
    made = synthesize_chat(runner, corpus(), 4, prefix_tokens=24, continuation_tokens=8, max_new_tokens=6,
                           cache_dir=tmp_path)
    assert made.shape[1] == 32 and 1 <= len(made) <= 4
    answers = made[:, 24:]
    assert ((answers == PAD).cumsum(1) > 0).eq(answers == PAD).all()  # padding only at the end of an answer
    assert (answers[:, :6] != PAD).any(1).all() and (answers[:, 6:] == PAD).all()
    (cached,) = tmp_path.glob("chat-*.json")
    monkeypatch.setattr(runner.model, "generate", lambda *a, **k: pytest.fail("regenerated instead of cached"))
    assert torch.equal(synthesize_chat(runner, corpus(), 4, prefix_tokens=24, continuation_tokens=8,
                                       max_new_tokens=6, cache_dir=tmp_path), made)
    monkeypatch.undo()
    assert torch.equal(synthesize_chat(runner, corpus(), 4, prefix_tokens=24, continuation_tokens=8,
                                       max_new_tokens=6), made)  # greedy: the same without the cache


def test_diversity_selection_and_loop_detection() -> None:
    assert farthest_first([[1, 2], [1, 2], [3, 4], [1, 3]], 2) == [0, 2]
    assert farthest_first([[1]], 5) == [0]
    assert loops([7, 8, 9] * 5) and not loops(list(range(15)))


def test_a_distillation_job_with_chat_data_records_its_objective_and_floor_check(settings) -> None:
    from app.training.jobs import run_training

    (settings.data_dir / "wikitext-2").mkdir(parents=True)
    (settings.data_dir / "wikitext-2" / "valid.txt").write_text(corpus())
    (settings.data_dir / "austen").mkdir(parents=True)
    (settings.data_dir / "austen" / "emma.txt").write_text(corpus(seed=1))
    from app.service import published_projections

    runner = tiny_runner()
    pid, published = next(iter(published_projections(runner, settings)[0].items()))  # the server's PCA projection
    config = SoftPromptConfig(name="d", projection_id=pid, mu=20.0, virtual_tokens=3, steps=3,
                              objective="distill", chat_examples=3, floor_segments=4, **{**SHAPE, "prefix_tokens": 24})
    manifest = run_training(runner, settings, config, {pid: published.projection}, activate=True)
    assert manifest["objective"] == "distill" and manifest["chat_examples"] >= 1
    check = manifest["floor_check"]
    assert check["data"] == "austen-emma" and check["segments"] == 4
    assert manifest["active"] == check["passes"]  # activated only if it passes
    assert manifests(settings.soft_prompt_dir)["d"] == manifest


def test_the_admin_api_takes_a_distillation_job_with_a_held_out_upload(settings, runner) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from app.api import create_app
    from tests.test_admin import KEY, finished

    settings.admin_key = SecretStr("s3cret")
    with TestClient(create_app(settings, runner=runner)) as admin:
        train, held = (admin.post("/admin/uploads", content=corpus(seed=seed).encode(),
                                  headers={**KEY, "content-type": "text/plain"}).json()["data"] for seed in (0, 1))
        pid = admin.get("/v1/bundle").json()["defaults"]["projection_id"]
        body = {"name": "distilled", "data": train, "floor_data": held, "floor_segments": 4, "objective": "distill",
                "projection_id": pid, "mu": 20.0, "virtual_tokens": 4, "steps": 2, "activate": True, **SHAPE}
        job = finished(admin, admin.post("/admin/soft-prompts", json=body, headers=KEY).json()["id"])
        assert job["state"] == "succeeded", job["error"]
        assert {"floor_check_nothing sent", "floor_check_private path"} <= set(job["held_out"])
        (listed,) = admin.get("/admin/soft-prompts", headers=KEY).json()
        manifest = listed["manifest"]
        assert manifest["objective"] == "distill" and manifest["floor_check"]["data"] == held
        served = [s["name"] for s in admin.get("/v1/bundle").json()["soft_prompts"]]
        assert served == (["distilled"] if manifest["floor_check"]["passes"] else [])
        bad = admin.post("/admin/soft-prompts", json={**body, "name": "x", "objective": "nonsense"}, headers=KEY)
        assert bad.status_code == 422
