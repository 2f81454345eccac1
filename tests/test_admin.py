"""The admin API over HTTP: the key, uploads, training jobs, and serving what they produce."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.api import create_app
from tests.test_training import SHAPE, corpus

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def admin(settings, runner):
    settings.admin_key = SecretStr("s3cret")
    with TestClient(create_app(settings, runner=runner)) as http:
        yield http


def finished(http: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (job := http.get(f"/admin/jobs/{job_id}", headers=KEY).json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_the_admin_api_needs_its_key(settings, runner, admin) -> None:
    with TestClient(create_app(settings.model_copy(update={"admin_key": None}), runner=runner)) as off:
        response = off.get("/admin/jobs", headers=KEY)
        assert response.status_code == 403 and "disabled" in response.json()["detail"]
    missing = admin.get("/admin/jobs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert admin.get("/admin/jobs", headers={"Authorization": "Bearer wrong"}).json()["error"] == "forbidden"
    assert admin.get("/admin/jobs", headers=KEY).json() == []


def test_upload_train_activate_serve_and_delete_a_soft_prompt(admin) -> None:
    upload = admin.post("/admin/uploads", content=corpus().encode(), headers={**KEY, "content-type": "text/plain"})
    assert upload.status_code == 201
    pid = admin.get("/v1/bundle").json()["defaults"]["projection_id"]
    body = {"name": "mine", "data": upload.json()["data"], "projection_id": pid, "mu": 20.0, "virtual_tokens": 4,
            "steps": 3, "activate": True, **SHAPE}
    started = admin.post("/admin/soft-prompts", json=body, headers=KEY)
    assert started.status_code == 202
    job = finished(admin, started.json()["id"])
    assert job["state"] == "succeeded" and job["step"] == 3 and len(job["losses"]) == 3
    assert set(job["held_out"]) == {"held_out_loss", "held_out_loss_without_prompt"}
    assert [s["name"] for s in admin.get("/v1/bundle").json()["soft_prompts"]] == ["mine"]  # served at once
    assert admin.post("/admin/soft-prompts", json=body, headers=KEY).status_code == 409  # the name is taken
    assert admin.post("/admin/jobs/" + job["id"] + "/cancel", headers=KEY).status_code == 409  # already done
    listed = admin.get("/admin/soft-prompts", headers=KEY).json()
    assert [(a["name"], a["active"]) for a in listed] == [("mine", True)]
    assert admin.post("/admin/soft-prompts/mine/deactivate", headers=KEY).json()["active"] is False
    assert admin.get("/v1/bundle").json()["soft_prompts"] == []
    assert admin.delete("/admin/soft-prompts/mine", headers=KEY).status_code == 200
    assert admin.get("/admin/soft-prompts", headers=KEY).json() == []


def test_a_projection_job_can_be_cancelled(admin) -> None:
    upload = admin.post("/admin/uploads", content=corpus(4000).encode(), headers={**KEY, "content-type": "text/plain"})
    body = {"name": "p", "data": upload.json()["data"], "dim": 8, "steps": 100_000, **SHAPE}
    job = admin.post("/admin/projections", json=body, headers=KEY).json()
    while admin.get(f"/admin/jobs/{job['id']}", headers=KEY).json()["step"] < 2:
        time.sleep(0.05)
    assert admin.post(f"/admin/jobs/{job['id']}/cancel", headers=KEY).status_code == 200
    assert finished(admin, job["id"])["state"] == "cancelled"
    assert admin.get("/admin/projections", headers=KEY).json() == []  # nothing half-written


@pytest.mark.parametrize("request_kwargs, status, error", [
    (dict(method="POST", url="/admin/uploads", content=b"\xff", headers={"content-type": "text/plain"}), 422,
     "invalid_parameter"),
    (dict(method="POST", url="/admin/uploads", content=b"x", headers={"content-type": "image/png"}), 415,
     "unsupported_media_type"),
    (dict(method="POST", url="/admin/projections", json={"name": "p", "data": "nonsense"}), 422, "invalid_parameter"),
    (dict(method="POST", url="/admin/projections", json={"name": "p"}), 422, "invalid_parameter"),  # corpus absent
    (dict(method="POST", url="/admin/projections", json={"name": "../up"}), 422, "invalid_parameter"),
    (dict(method="POST", url="/admin/projections", json={"name": "p", "steps": 0}), 422, "invalid_parameter"),
    (dict(method="POST", url="/admin/soft-prompts", json={"name": "s", "mu": 5, "projection_id": "0" * 16}), 422,
     "invalid_parameter"),
    (dict(method="POST", url="/admin/projections", json={"name": "p", "data": "upload:" + "0" * 64}), 422,
     "invalid_parameter"),
    (dict(method="GET", url="/admin/jobs/nope"), 404, "not_found"),
    (dict(method="POST", url="/admin/jobs/nope/resume"), 404, "not_found"),
    (dict(method="POST", url="/admin/projections/nope/activate"), 404, "not_found"),
    (dict(method="DELETE", url="/admin/soft-prompts/nope"), 404, "not_found"),
    (dict(method="GET", url="/admin/other-things"), 422, "invalid_parameter"),
])
def test_bad_admin_requests_get_json_errors(admin, request_kwargs: dict, status: int, error: str) -> None:
    request_kwargs["headers"] = {**KEY, **request_kwargs.get("headers", {})}
    response = admin.request(**request_kwargs)
    assert (response.status_code, response.json()["error"]) == (status, error), response.text


def test_dp_soft_prompt_jobs_charge_the_tenant_and_are_refused_past_the_limit(admin) -> None:
    upload = admin.post("/admin/uploads", content=corpus().encode(), headers={**KEY, "content-type": "text/plain"})
    pid = admin.get("/v1/bundle").json()["defaults"]["projection_id"]
    assert admin.put("/admin/tenants/acme/budget", json={"epsilon": 5.0}, headers=KEY).json()["remaining"] == 5.0
    body = {"name": "acme-dp", "tenant": "acme", "target_epsilon": 3.0, "data": upload.json()["data"],
            "projection_id": pid, "mu": 20.0, "virtual_tokens": 4, "steps": 2, "batch_size": 4,
            "physical_batch_size": 2, "secure_rng": False, **SHAPE}
    started = admin.post("/admin/dp-soft-prompts", json=body, headers=KEY)
    assert started.status_code == 202 and started.json()["kind"] == "dp_soft_prompt"
    job = finished(admin, started.json()["id"])
    assert job["state"] == "succeeded" and job["step"] == 2, job.get("error")
    manifest = next(a for a in admin.get("/admin/soft-prompts", headers=KEY).json() if a["name"] == "acme-dp")["manifest"]
    assert 0 < manifest["dp"]["epsilon"] <= 3.0 and manifest["dp"]["tenant"] == "acme"

    budget = admin.get("/admin/tenants/acme/budget", headers=KEY).json()
    assert budget["spent"] == 3.0 and [c["job"] for c in budget["charges"]] == [job["id"]]
    refused = admin.post("/admin/dp-soft-prompts", json={**body, "name": "acme-dp-2"}, headers=KEY)
    assert refused.status_code == 409 and "2 of 5" in refused.json()["detail"]
    assert len(admin.get("/admin/jobs", headers=KEY).json()) == 1  # refused before it was queued
    assert admin.put("/admin/tenants/acme/budget", json={"epsilon": -1}, headers=KEY).status_code == 422


@pytest.mark.parametrize("tenant", ["bad%20name!", "-leading-dash", "a" * 65, "semi%3Bcolon"])
def test_tenant_budget_routes_refuse_names_outside_the_pattern(admin, tenant: str) -> None:
    for method, body in (("GET", None), ("PUT", {"epsilon": 1.0})):
        response = admin.request(method, f"/admin/tenants/{tenant}/budget", json=body, headers=KEY)
        assert response.request.url.raw_path.decode() == f"/admin/tenants/{tenant}/budget"  # not normalised away
        assert (response.status_code, response.json()["error"]) == (422, "invalid_parameter"), response.text
    assert admin.get("/admin/tenants/good-name/budget", headers=KEY).status_code == 200


def test_admin_changes_and_refused_keys_go_to_the_audit_log(admin, settings) -> None:
    import json

    admin.post("/admin/uploads", content=corpus().encode(), headers={**KEY, "content-type": "text/plain"})
    admin.post("/admin/soft-prompts/nope/activate", headers=KEY)
    admin.get("/admin/jobs", headers={"Authorization": "Bearer wrong"})
    admin.get("/admin/jobs", headers=KEY)  # a read: not audited
    lines = [json.loads(line) for line in (settings.cache_dir / "audit.log").read_text().splitlines()]
    assert [(e["method"], e["route"], e["status"]) for e in lines] == [
        ("POST", "/admin/uploads", 201), ("POST", "/admin/{kind}/{name}/activate", 404), ("GET", "/admin/jobs", 403)]
    assert lines[1]["path_params"] == {"kind": "soft-prompts", "name": "nope"}
    assert "the" not in json.dumps(lines[0])  # the uploaded text is never logged
