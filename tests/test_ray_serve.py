"""Two Ray Serve replicas (app/ray_serve.py) on the tiny model: both serve, and they agree on client keys, training
jobs and the artifacts those jobs make. The replicas load the model themselves, from a directory saved here."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")

from app.cli import cli  # noqa: E402
from app.keys import KeyStore, key_file  # noqa: E402
from app.ray_serve import REPLICA_HEADER, deployment, free_port  # noqa: E402
from app.settings import ServerSettings  # noqa: E402
from client_sdk import wire  # noqa: E402
from client_sdk.mechanism import MechanismParams  # noqa: E402
from tests.conftest import tiny_runner, tiny_tokenizer  # noqa: E402
from tests.test_training import SHAPE, corpus  # noqa: E402

REPLICAS = 2
ADMIN = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> ServerSettings:
    root = tmp_path_factory.mktemp("ray")
    tiny_runner().model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    return ServerSettings(model=str(root / "model"), cache_dir=root / "cache", soft_prompt_dir=root / "soft_prompts",
                          projection_dir=root / "projections", data_dir=root / "data", projection_dim=8, clip=2.0,
                          default_mu=20.0, max_prompt_tokens=64, max_new_tokens=8, require_api_key=True,
                          admin_key=SecretStr("s3cret"), port=free_port())


@pytest.fixture(scope="module")
def http(settings: ServerSettings) -> Iterator[httpx.Client]:
    with deployment(settings, REPLICAS, startup_timeout=240) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def from_each_replica(send: Callable[[], httpx.Response], tries: int = 60) -> dict[str, httpx.Response]:
    """Send until every replica has answered once; each replica's first answer, by replica id."""
    answers: dict[str, httpx.Response] = {}
    for _ in range(tries):
        response = send()
        answers.setdefault(response.headers[REPLICA_HEADER], response)
        if len(answers) == REPLICAS:
            return answers
    raise AssertionError(f"only replicas {sorted(answers)} answered {tries} requests")


def test_both_replicas_generate_and_a_revoked_key_is_refused_by_both(http: httpx.Client,
                                                                      settings: ServerSettings) -> None:
    record, key = KeyStore(key_file(settings)).create("app")
    client = {"Authorization": f"Bearer {key}"}
    info = http.get("/v1/bundle", headers=client).json()
    params = MechanismParams.from_mu(20.0, bits=4, dim=8, clip=2.0)
    body = wire.encode(wire.Payload(params, info["defaults"]["projection_id"], np.zeros((3, 8), dtype=np.uint8)))

    generated = from_each_replica(lambda: http.post("/v1/generate", params={"max_new_tokens": 3}, content=body,
                                                    headers={**client, "content-type": "application/octet-stream"}))
    assert [r.status_code for r in generated.values()] == [200] * REPLICAS
    assert all(r.json()["completion_tokens"] >= 1 for r in generated.values())

    revoked = CliRunner().invoke(cli, ["keys", "revoke", record.id], env={"VEIL_CACHE_DIR": str(settings.cache_dir)})
    assert revoked.exit_code == 0, revoked.output
    refused = from_each_replica(lambda: http.get("/v1/bundle", headers=client))
    assert [r.status_code for r in refused.values()] == [403] * REPLICAS


def test_a_job_started_through_one_replica_is_seen_and_its_artifact_served_by_both(
        http: httpx.Client, settings: ServerSettings) -> None:
    _, key = KeyStore(key_file(settings)).create("app")
    client = {"Authorization": f"Bearer {key}"}

    def soft_prompts() -> dict[str, list[str]]:
        bundles = from_each_replica(lambda: http.get("/v1/bundle", headers=client))
        return {replica: [s["name"] for s in r.json()["soft_prompts"]] for replica, r in bundles.items()}

    upload = http.post("/admin/uploads", content=corpus().encode(), headers={**ADMIN, "content-type": "text/plain"})
    projection_id = http.get("/v1/bundle", headers=client).json()["defaults"]["projection_id"]
    started = http.post("/admin/soft-prompts", headers=ADMIN, json={
        "name": "mine", "data": upload.json()["data"], "projection_id": projection_id, "mu": 20.0,
        "virtual_tokens": 4, "steps": 3, "activate": True, **SHAPE})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    deadline = time.monotonic() + 120
    while http.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    jobs = from_each_replica(lambda: http.get(f"/admin/jobs/{job_id}", headers=ADMIN))
    assert [(r.status_code, r.json()["state"], r.json()["step"]) for r in jobs.values()] == [(200, "succeeded", 3)] * 2
    assert list(soft_prompts().values()) == [["mine"]] * REPLICAS
    assert http.post("/admin/soft-prompts/mine/deactivate", headers=ADMIN).status_code == 200  # on one replica
    assert list(soft_prompts().values()) == [[]] * REPLICAS


def test_inverted_autoscaling_bounds_are_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(cli, ["serve", "--min-replicas", "3", "--max-replicas", "2"])
    assert result.exit_code == 2 and "--min-replicas must not exceed --max-replicas" in result.output
