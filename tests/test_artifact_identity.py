"""Artifact identity: a projection's id comes from the table file it ships, so it (and every soft prompt pinned to
it) is the same on every machine; the base model is named by content; what is not served is said at start-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.api import create_app
from app.artifacts import manifests, set_active
from app.model_runner import file_sha256, smollm2_gguf_path
from app.reconstruction import TABLE_FILE
from app.soft_prompts import save_soft_prompt
from app.training.projection import ProjectionConfig, train_projection
from client_sdk.bundle import sha256_hex
from tests.conftest import tiny_runner
from tests.test_training import SHAPE, corpus

REPO = Path(__file__).resolve().parents[1]


def trained(settings, runner) -> str:
    """A projection trained and activated for `runner`, with a soft prompt pinned to it; returns its id."""
    manifest = train_projection(runner, ProjectionConfig(name="proj", dim=8, steps=2, **SHAPE), corpus(),
                                settings.projection_dir)
    set_active(settings.projection_dir / "proj", True)
    save_soft_prompt(torch.randn(3, 32), settings.soft_prompt_dir / "sp",
                     {"model_id": "tiny-llama", "base_model_sha256": runner.fingerprint,
                      "projection_id": manifest["id"], "bits": 4, "mu": 10.0, "active": True}, runner)
    return manifest["id"]


def test_a_projection_keeps_its_id_and_soft_prompts_where_the_model_converts_with_other_rounding(settings) -> None:
    runner = tiny_runner()
    pid = trained(settings, runner)
    # another machine's conversion of the same checkpoint: the same file (fingerprint), other float rounding
    elsewhere = tiny_runner()
    with torch.no_grad():
        elsewhere.input_embeddings.add_(torch.randn_like(elsewhere.input_embeddings) * 1e-3)
    elsewhere.fingerprint = runner.fingerprint
    with TestClient(create_app(settings, runner=elsewhere)) as http:
        bundle = http.get("/v1/bundle").json()
        table = http.get(f"/v1/bundle/projections/{pid}").content
    assert pid in {p["id"] for p in bundle["projections"]}
    assert [s["name"] for s in bundle["soft_prompts"]] == ["sp"]
    assert table == (settings.projection_dir / "proj" / TABLE_FILE).read_bytes()


def test_artifacts_for_another_base_model_are_not_served_and_the_start_up_log_says_why(settings, caplog) -> None:
    pid = trained(settings, tiny_runner())
    other = tiny_runner()
    other.fingerprint = "f" * 64  # the same name and width, another checkpoint
    with caplog.at_level("INFO", logger="veil.startup"), TestClient(create_app(settings, runner=other)) as http:
        bundle = http.get("/v1/bundle").json()
    assert pid not in {p["id"] for p in bundle["projections"]} and bundle["soft_prompts"] == []
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "veil.startup"]
    assert lines[0]["event"] == "startup" and lines[0]["base_model_sha256"] == "f" * 64
    assert lines[0]["versions"]["torch"] == torch.__version__
    reasons = {line["artifact"]: line["reason"] for line in lines[1:] if line["event"] == "not_served"}
    assert set(reasons) == {"projections/proj", "soft_prompts/sp"}
    assert all("trained for base model" in reason for reason in reasons.values())


def test_a_table_that_does_not_match_its_id_is_not_served(settings, caplog) -> None:
    runner = tiny_runner()
    pid = trained(settings, runner)
    table = settings.projection_dir / "proj" / TABLE_FILE
    table.write_bytes(table.read_bytes()[:-1] + b"\x01")
    with caplog.at_level("INFO", logger="veil.startup"), TestClient(create_app(settings, runner=runner)) as http:
        assert pid not in {p["id"] for p in http.get("/v1/bundle").json()["projections"]}
        assert http.app.state.service.catalog.not_served["soft_prompts/sp"] == f"its projection {pid} is not served"
    assert any("its table's id is" in r.getMessage() for r in caplog.records if r.name == "veil.startup")


def test_shipped_artifacts_name_their_shipped_tables_and_the_default_models_gguf() -> None:
    projections, prompts = manifests(REPO / "projections"), manifests(REPO / "soft_prompts")
    assert projections and prompts
    for name, manifest in projections.items():
        assert manifest["id"] == sha256_hex((REPO / "projections" / name / TABLE_FILE).read_bytes())[:16], name
    active = {m["id"] for m in projections.values() if m["active"]}
    assert {m["projection_id"] for m in prompts.values() if m["active"]} <= active
    fingerprints = {m["base_model_sha256"] for m in [*projections.values(), *prompts.values()]}
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert fingerprints == {file_sha256(gguf)}
