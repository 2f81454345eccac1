"""Client API keys (hashed, revocable, from the CLI) and the per-key rate limit, on the tiny model."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.api import create_app
from app.access import ClientAccess, Throttle, bearer_key
from app.keys import KeyStore, key_file
from client_sdk import wire
from app.cli import cli
from client_sdk.mechanism import MechanismParams


def test_keys_are_stored_hashed_and_can_be_revoked(tmp_path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    record, key = store.create("alice")
    assert key.startswith(f"veil_{record.id}_") and key not in (tmp_path / "keys.json").read_text()
    assert store.verify(key).name == "alice"
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("veil_00000000_x") is None and store.verify("nonsense") is None
    store.revoke(record.id)
    assert KeyStore(tmp_path / "keys.json").verify(key) is None  # persisted


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """time.time() (the rate limiter's clock and Retry-After's) stopped at clock[0], which the test moves."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


@pytest.mark.parametrize("count, what", [(Throttle.admit, "requests"), (Throttle.failed, "failed authentications")],
                         ids=["requests", "failed-authentications"])
def test_the_rate_limit_counts_per_caller_in_a_moving_minute(settings, clock, count, what) -> None:
    settings.rate_limit_per_minute = settings.auth_failures_per_minute = 2
    throttle = Throttle(settings)

    def retry_after() -> str:
        with pytest.raises(HTTPException) as refused:
            count(throttle, "a")
        assert refused.value.status_code == 429
        assert refused.value.detail == f"rate limit of 2 {what} a minute"  # says which limit was hit
        return refused.value.headers["Retry-After"]

    count(throttle, "a")
    clock[0] += 20
    count(throttle, "a")
    clock[0] += 10
    assert retry_after() == "30"  # when a's first event leaves the window
    count(throttle, "b")  # per caller
    clock[0] += 29.8
    assert retry_after() == "1"  # never 0 (0.2 s left)
    clock[0] += 0.3
    count(throttle, "a")  # the first event has left the window: one place free
    assert retry_after() == "20"


def test_only_the_bearer_scheme_carries_a_key() -> None:
    assert bearer_key("Bearer veil_1_x") == bearer_key("bearer veil_1_x") == "veil_1_x"
    assert bearer_key("Basic veil_1_x") is None and bearer_key("Bearer ") is None and bearer_key(None) is None
    assert bearer_key("Bearer veil_1_x y") == "veil_1_x y"  # all after the scheme: refused as unknown (403), not 401


def test_without_keys_a_caller_is_its_address_and_of_no_tenant(settings) -> None:
    settings.rate_limit_per_minute = 1
    access = ClientAccess(settings, Throttle(settings))
    requests = [Request({"type": "http", "headers": [], "client": client})
                for client in (None, ("198.51.100.7", 40000), None)]  # no peer address (e.g. a Unix socket)
    access(requests[0])
    access(requests[1])
    assert requests[0].state.tenant is None and requests[1].state.tenant is None
    with pytest.raises(HTTPException) as refused:  # the requests without an address count as one caller
        access(requests[2])
    assert refused.value.status_code == 429


def create_keys(path: Path, prefix: str, count: int, start: Barrier) -> None:
    """One process's edits: wait for the other process, then create `count` keys in the store at `path`."""
    store = KeyStore(path)
    start.wait(timeout=120)
    for i in range(count):
        store.create(f"{prefix}-{i}")


def test_concurrent_key_edits_from_two_processes_lose_nothing(tmp_path) -> None:
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)  # both edit at once
    processes = [spawn.Process(target=create_keys, args=(tmp_path / "keys.json", name, 30, start))
                 for name in ("one", "two")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    names = sorted(record.name for record in KeyStore(tmp_path / "keys.json").records().values())
    assert names == sorted(f"{p}-{i}" for p in ("one", "two") for i in range(30))


def test_failed_authentication_from_one_address_never_locks_out_another(settings, runner) -> None:
    settings.require_api_key, settings.auth_failures_per_minute = True, 3
    _, good = KeyStore(key_file(settings)).create("app")
    app = create_app(settings, runner=runner)
    wrong = {"Authorization": "Bearer veil_0_wrong"}
    with TestClient(app, client=("203.0.113.1", 40000)) as attacker:
        assert [attacker.get("/v1/bundle", headers=wrong).status_code for _ in range(4)] == [403, 403, 403, 429]
        other = TestClient(app, client=("198.51.100.7", 40000))  # another address, same app (started above)
        assert other.get("/v1/bundle", headers=wrong).status_code == 403  # its keys are still checked
        assert other.get("/v1/bundle", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert attacker.get("/v1/bundle", headers=wrong).status_code == 429


def payload(http: TestClient, headers: dict) -> bytes:
    info = http.get("/v1/bundle", headers=headers).json()
    params = MechanismParams.from_mu(10.0, bits=4, dim=8, clip=2.0)
    return wire.encode(wire.Payload(params, info["defaults"]["projection_id"], np.zeros((2, 8), dtype=np.uint8)))


def test_the_server_requires_valid_keys_and_answers_429_past_the_rate(settings, runner) -> None:
    settings.require_api_key, settings.rate_limit_per_minute = True, 4
    store = KeyStore(key_file(settings))
    _, key = store.create("app")
    good = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, runner=runner)) as http:
        missing = http.get("/v1/bundle")
        assert missing.status_code == 401
        assert missing.json()["detail"] == "API key required: Authorization: Bearer <key>"  # says how to send one
        unknown = http.get("/v1/bundle", headers={"Authorization": "Bearer veil_1234abcd_nope"})
        assert unknown.status_code == 403 and unknown.json()["detail"] == "unknown or revoked API key"
        body = payload(http, good)  # request 1 of 4
        generated = http.post("/v1/generate", params={"max_new_tokens": 2}, content=body,
                              headers={**good, "content-type": "application/octet-stream"})
        assert generated.status_code == 200
        assert http.get("/v1/bundle", headers=good).status_code == 200
        assert http.get("/v1/bundle", headers=good).status_code == 200
        limited = http.get("/v1/bundle", headers=good)
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert http.get("/healthz").status_code == 200  # health is never limited or keyed


def test_veil_keys_creates_lists_and_revokes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path))
    created = CliRunner().invoke(cli, ["keys", "create", "--name", "mobile-app"])
    assert created.exit_code == 0, created.output
    key = created.output.split()[0]
    key_id = key.split("_")[1]
    listed = CliRunner().invoke(cli, ["keys", "list"])
    assert key_id in listed.output and "mobile-app" in listed.output and key not in listed.output
    assert CliRunner().invoke(cli, ["keys", "revoke", key_id]).exit_code == 0
    assert "REVOKED" in CliRunner().invoke(cli, ["keys", "list"]).output
    assert CliRunner().invoke(cli, ["keys", "revoke", "ffffffff"]).exit_code != 0
    assert KeyStore(tmp_path / "api-keys.json").verify(key) is None
    tenant_key = CliRunner().invoke(cli, ["keys", "create", "--name", "acme-app", "--tenant", "acme"]).output.split()[0]
    assert KeyStore(tmp_path / "api-keys.json").verify(tenant_key).tenant == "acme"
    assert "tenant acme" in CliRunner().invoke(cli, ["keys", "list"]).output
    assert CliRunner().invoke(cli, ["keys", "create", "--name", "x", "--tenant", "../etc"]).exit_code != 0
