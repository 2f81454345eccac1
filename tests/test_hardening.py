"""The red team's findings (issue 15), server side: each test fails against the code before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.api import create_app, uvicorn_options
from app.artifacts import SERVER_ONLY, TRAINING_RECORD, manifests, write_artifact
from app.files import append_line
from app.keys import KeyStore, key_file
from app.metrics import MU_BUCKETS, Metrics
from app.soft_prompts import save_soft_prompt
from app.training.jobs import JobManager, JobState
from app.training.projection import ProjectionConfig, train_projection
from client_sdk import wire
from client_sdk.mechanism import MechanismParams
from tests.conftest import LoopbackServer, tiny_runner
from tests.test_training import SHAPE, corpus

KEY = {"Authorization": "Bearer s3cret"}
REPO = Path(__file__).resolve().parents[1]


class Server(LoopbackServer):
    """A loopback server run with the options `veil serve` uses (uvicorn_options), on a free port."""

    def __init__(self, app, settings) -> None:
        super().__init__(app)
        options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": self.port, "log_config": None}
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def raw_request(port: int, head: str, body_pieces=(), gap: float = 0.0, wait: float = 10.0) -> tuple[str, float]:
    """Send a request's head and then `body_pieces` `gap` seconds apart on a raw socket; the status line of the
    answer (or "" if none came within `wait` s) and when it came."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode())
        sock.settimeout(gap or 0.01)
        answer = b""
        for piece in body_pieces:
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed
                break
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except (socket.timeout, BlockingIOError):
                pass
            if time.monotonic() - start > wait:
                break
        sock.settimeout(max(0.1, wait - (time.monotonic() - start)))
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return answer.split(b"\r\n")[0].decode(), time.monotonic() - start


# --- availability -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/generate", "/admin/projections"])
def test_a_body_trickled_in_gets_408_within_the_body_timeout(settings, runner, path) -> None:
    settings.admin_key, settings.body_timeout_s = SecretStr("s3cret"), 1.0
    with Server(create_app(settings, runner=runner), settings) as server:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, seconds = raw_request(server.port, head, [b"1\r\nx\r\n"] * 20, gap=0.5, wait=8)
    assert status == "HTTP/1.1 408 Request Timeout" and seconds < 4


def test_request_heads_are_bounded_in_size(settings, runner) -> None:
    with Server(create_app(settings, runner=runner), settings) as server:
        status, _ = raw_request(server.port, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * 2**18 + "\r\n\r\n")
        assert status == "HTTP/1.1 400 Bad Request"  # not buffered whole (httptools answered 200 to 8 MiB)
        assert raw_request(server.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == "HTTP/1.1 200 OK"


def test_deeply_nested_jsonl_is_a_json_422(settings, runner) -> None:
    settings.admin_key = SecretStr("s3cret")
    with TestClient(create_app(settings, runner=runner), raise_server_exceptions=False) as http:
        deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
        response = http.post("/admin/uploads", content=deep, headers={**KEY, "content-type": "application/jsonl"})
    assert response.status_code == 422 and "nested too deeply" in response.json()["detail"]


def test_uploads_are_parsed_off_the_event_loop(settings, runner, monkeypatch) -> None:
    import app.admin

    loops = []

    def parse(data: bytes) -> str:
        try:
            loops.append(asyncio.get_running_loop())
        except RuntimeError:
            loops.append(None)
        return data.decode()

    monkeypatch.setattr(app.admin, "parse_upload", parse)
    settings.admin_key = SecretStr("s3cret")
    with TestClient(create_app(settings, runner=runner)) as http:
        assert http.post("/admin/uploads", content=b"hello", headers={**KEY, "content-type": "text/plain"}).is_success
    assert loops == [None]  # a worker thread: no event loop there to block


# --- access -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("admin_key, authorization, status", [
    (None, "Bearer s3cret", "403"),  # the admin API is off
    ("s3cret", "Bearer wrong", "403"),
    ("s3cret", "", "401"),
    ("s3cret", "Bearer s3cret", "413"),  # the right key, a body over the admin JSON limit
])
def test_admin_requests_are_refused_before_their_body_is_read(settings, runner, admin_key, authorization,
                                                              status) -> None:
    settings.admin_key = SecretStr(admin_key) if admin_key else None
    with Server(create_app(settings, runner=runner), settings) as server:
        head = (f"POST /admin/projections HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {50 * 2**20}\r\n" + (f"Authorization: {authorization}\r\n" if authorization else "")
                + "\r\n")
        answer, _ = raw_request(server.port, head, [b"{" + b" " * 1023], wait=5)  # 1 KiB of the 50 MiB sent
    assert answer.startswith(f"HTTP/1.1 {status}")


def test_forwarded_headers_are_believed_only_from_trusted_proxies(settings, runner) -> None:
    settings.rate_limit_per_minute = 3
    assert uvicorn_options(settings)["proxy_headers"] is False

    def statuses(trusted: str) -> list[int]:
        settings.trusted_proxies = trusted
        with Server(create_app(settings, runner=runner), settings) as server:
            import httpx

            return [httpx.get(f"{server.url}/v1/bundle", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                    for i in range(6)]

    assert statuses("") == [200, 200, 200, 429, 429, 429]  # one peer: the header is ignored
    assert statuses("127.0.0.1") == [200] * 6  # behind a trusted proxy each forwarded address counts apart


def test_failed_authentication_is_throttled_per_address_and_not_audited_past_the_limit(settings, runner) -> None:
    settings.admin_key, settings.require_api_key, settings.auth_failures_per_minute = SecretStr("s3cret"), True, 5
    _, good = KeyStore(key_file(settings)).create("app")
    with TestClient(create_app(settings, runner=runner)) as http:
        wrong = [http.get("/admin/jobs", headers={"Authorization": "Bearer wrong"}).status_code for _ in range(3)]
        wrong += [http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_x"}).status_code for _ in range(2)]
        assert wrong == [403] * 5
        throttled = [http.post("/admin/projections", headers={"Authorization": "Bearer wrong"}).status_code,
                     http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_x"}).status_code,
                     http.get("/v1/bundle").status_code]
        assert throttled == [429] * 3
        # valid keys behind the same address still get in (issue 24)
        assert http.get("/admin/jobs", headers=KEY).status_code == 200
        assert http.get("/v1/bundle", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    audit = (settings.cache_dir / "audit.log").read_text().splitlines()
    assert len(audit) == 5


def test_rate_limits_use_the_configured_storage(settings) -> None:
    from limits.errors import ConfigurationError

    from app.access import Throttle

    assert type(Throttle(settings).limiter.storage).__name__ == "MemoryStorage"
    with pytest.raises(ConfigurationError):  # the URI is honoured, not ignored (redis:// needs a Redis client)
        Throttle(settings.model_copy(update={"rate_limit_storage": "nosuch://host"}))


def test_the_audit_log_is_rotated_at_its_size_cap(tmp_path) -> None:
    log = tmp_path / "audit.log"
    for i in range(100):
        append_line(log, json.dumps({"n": i, "pad": "x" * 80}), max_bytes=1000)
    assert log.stat().st_size <= 1000 and (tmp_path / "audit.log.1").stat().st_size <= 1000
    kept = [json.loads(line)["n"] for p in ("audit.log.1", "audit.log") for line in (tmp_path / p).read_text().splitlines()]
    assert kept == list(range(100 - len(kept), 100))  # the newest lines, in order


def test_docs_are_off_unless_asked_for(settings, runner) -> None:
    with TestClient(create_app(settings, runner=runner)) as http:
        assert [http.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
    with TestClient(create_app(settings.model_copy(update={"docs": True}), runner=runner)) as http:
        assert [http.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [200] * 3


def test_the_container_runs_as_a_non_root_user() -> None:
    lines = [line.split() for line in (REPO / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    cmd = max(i for i, words in enumerate(lines) if words[0] == "CMD")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert max(i for i, words in enumerate(lines) if words[0] == "USER") < cmd


# --- tenants ----------------------------------------------------------------------------------------------------


def test_a_tenants_dp_prompt_is_served_only_to_that_tenants_keys(settings, runner) -> None:
    settings.require_api_key = True
    store = KeyStore(key_file(settings))
    keys = {tenant: {"Authorization": f"Bearer {store.create(tenant or 'plain', tenant)[1]}"}
            for tenant in ("acme", "globex", None)}
    with TestClient(create_app(settings, runner=runner)) as http:
        pid = http.get("/v1/bundle", headers=keys[None]).json()["defaults"]["projection_id"]
    for name, tenant in (("acme-dp", "acme"), ("public", None)):
        manifest = {"model_id": "tiny-llama", "base_model_sha256": runner.fingerprint, "projection_id": pid,
                    "bits": 4, "mu": 10.0 if tenant else 50.0, "active": True, **({"dp": {"tenant": tenant}} if tenant else {})}
        save_soft_prompt(torch.randn(3, 32), settings.soft_prompt_dir / name, manifest, runner)
    body = wire.encode(wire.Payload(MechanismParams.from_mu(10.0, bits=4, dim=8, clip=2.0), pid,
                                    np.zeros((2, 8), dtype=np.uint8)))
    served, listed = {}, {}
    with TestClient(create_app(settings, runner=runner)) as http:
        for tenant, key in keys.items():
            response = http.post("/v1/generate", params={"max_new_tokens": 1}, content=body,
                                 headers={**key, "content-type": "application/octet-stream"})
            served[tenant] = response.json()["soft_prompt"]
            listed[tenant] = {s["name"] for s in http.get("/v1/bundle", headers=key).json()["soft_prompts"]}
    assert served == {"acme": "acme-dp", "globex": "public", None: "public"}
    assert listed == {"acme": {"acme-dp", "public"}, "globex": {"public"}, None: {"public"}}


def test_a_dp_manifest_keeps_its_training_record_server_side(tmp_path) -> None:
    manifest = {"model_id": "m", "dp": {"epsilon": 1.0}, "data_sha256": "ab" * 32, "train_segments": 7,
                "loss_curve": [1.0], "held_out_loss": 2.0, "held_out_loss_without_prompt": 3.0, "bits": 4}
    write_artifact(tmp_path / "dp", {"weights": b"w"}, manifest)
    write_artifact(tmp_path / "plain", {"weights": b"w"}, {k: v for k, v in manifest.items() if k != "dp"})
    listed = manifests(tmp_path)
    assert not SERVER_ONLY & listed["dp"].keys() and listed["dp"]["bits"] == 4
    assert json.loads((tmp_path / "dp" / TRAINING_RECORD).read_text()) == {k: manifest[k] for k in SERVER_ONLY}
    assert set(SERVER_ONLY) <= listed["plain"].keys()  # no DP promise: nothing to keep back


# --- data integrity ---------------------------------------------------------------------------------------------


@pytest.fixture
def admin(settings):
    settings.admin_key = SecretStr("s3cret")
    runner = tiny_runner()
    real = runner.model.forward

    def slow_forward(*args, **kwargs):  # jobs run long enough to act on them mid-run
        time.sleep(0.01)
        return real(*args, **kwargs)

    runner.model.forward = slow_forward
    with TestClient(create_app(settings, runner=runner)) as http:
        http.upload = http.post("/admin/uploads", content=corpus().encode(),
                                headers={**KEY, "content-type": "TEXT/Plain; charset=UTF-8"})  # any case
        assert http.upload.status_code == 201, http.upload.text
        yield http


def wait(http: TestClient, job_id: str, until=lambda job: job["state"] not in ("queued", "running")) -> dict:
    deadline = time.monotonic() + 120
    while not until(job := http.get(f"/admin/jobs/{job_id}", headers=KEY).json()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_a_name_is_reserved_when_its_job_is_accepted(admin) -> None:
    body = {"name": "rt-dup", "data": admin.upload.json()["data"], "dim": 8, "steps": 100_000, **SHAPE}
    results = [None] * 4

    def post(i: int) -> None:
        results[i] = admin.post("/admin/projections", json=body, headers=KEY)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [202, 409, 409, 409]
    accepted = next(r.json() for r in results if r.status_code == 202)
    admin.post(f"/admin/jobs/{accepted['id']}/cancel", headers=KEY)
    wait(admin, accepted["id"])


def test_a_projection_in_use_is_kept_served_and_a_job_whose_projection_vanished_fails(admin, settings) -> None:
    from app.artifacts import delete_artifact

    def projection_ids() -> set[str]:
        return {p["id"] for p in admin.get("/v1/bundle").json()["projections"]}

    data, pca = admin.upload.json()["data"], projection_ids()
    job = admin.post("/admin/projections", json={"name": "p", "data": data, "dim": 8, "steps": 2, "activate": True,
                                                 **SHAPE}, headers=KEY).json()
    assert wait(admin, job["id"])["state"] == "succeeded"
    (pid,) = projection_ids() - pca
    prompt = {"data": data, "projection_id": pid, "mu": 20.0, "virtual_tokens": 2, "activate": True, **SHAPE}
    done = admin.post("/admin/soft-prompts", json={**prompt, "name": "uses-p", "steps": 1}, headers=KEY).json()
    assert wait(admin, done["id"])["state"] == "succeeded"
    refused = admin.delete("/admin/projections/p", headers=KEY)
    assert refused.status_code == 409 and "uses-p" in refused.json()["detail"]
    kept = admin.post("/admin/projections/p/deactivate", headers=KEY)  # its prompt would be listed but never served
    assert kept.status_code == 409 and "uses-p" in kept.json()["detail"] and pid in projection_ids()

    admin.post("/admin/soft-prompts/uses-p/deactivate", headers=KEY)
    assert admin.post("/admin/projections/p/deactivate", headers=KEY).status_code == 200
    orphan = admin.post("/admin/soft-prompts/uses-p/activate", headers=KEY)  # listed, but never servable
    assert orphan.status_code == 409 and pid in orphan.json()["detail"]
    assert not manifests(settings.soft_prompt_dir)["uses-p"]["active"]
    assert admin.post("/admin/projections/p/activate", headers=KEY).status_code == 200
    assert admin.post("/admin/soft-prompts/uses-p/activate", headers=KEY).status_code == 200
    admin.post("/admin/soft-prompts/uses-p/deactivate", headers=KEY)
    running = admin.post("/admin/soft-prompts", json={**prompt, "name": "late", "steps": 40}, headers=KEY).json()
    wait(admin, running["id"], until=lambda j: j["step"] >= 1)
    busy = admin.delete("/admin/projections/p", headers=KEY)
    assert busy.status_code == 409 and running["id"] in busy.json()["detail"]
    delete_artifact(settings.projection_dir / "p")  # out of band (e.g. another process): the job must notice
    failed = wait(admin, running["id"])
    assert failed["state"] == "failed" and "deleted" in failed["error"]
    assert "late" not in manifests(settings.soft_prompt_dir)


def test_a_job_does_not_activate_a_soft_prompt_whose_projection_is_not_served(admin, settings) -> None:
    data = admin.upload.json()["data"]
    before = {p["id"] for p in admin.get("/v1/bundle").json()["projections"]}
    job = admin.post("/admin/projections", json={"name": "idle", "data": data, "dim": 8, "steps": 2, **SHAPE},
                     headers=KEY).json()
    assert wait(admin, job["id"])["state"] == "succeeded"
    (pid,) = {a["manifest"]["id"] for a in admin.get("/admin/projections", headers=KEY).json()} - before
    prompt = admin.post("/admin/soft-prompts", json={"name": "on-idle", "data": data, "projection_id": pid, "mu": 20.0,
                                                     "virtual_tokens": 2, "steps": 1, "activate": True, **SHAPE},
                        headers=KEY).json()
    done = wait(admin, prompt["id"])
    kept = manifests(settings.soft_prompt_dir)["on-idle"]
    assert done["state"] == "succeeded" and not kept["active"] and pid in kept["inactive_reason"]


def test_replacing_an_artifact_is_one_rename_of_fsynced_files(tmp_path, monkeypatch) -> None:
    import app.files

    synced, renames = set(), []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(app.files.os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")),
                                                           real_fsync(fd)))
    monkeypatch.setattr(app.files.os, "replace", lambda a, b: (renames.append(Path(b)), real_replace(a, b)))
    write_artifact(tmp_path / "a", {"x": b"old"}, {"model_id": "m"})
    synced.clear(), renames.clear()
    write_artifact(tmp_path / "a", {"x": b"new"}, {"model_id": "m"})
    version = (tmp_path / "a").resolve()
    assert renames == [tmp_path / "a"] and (tmp_path / "a" / "x").read_bytes() == b"new"
    assert {str(version / "x"), str(version / "manifest.json"), str(version), str(tmp_path)} <= synced
    assert versions(tmp_path) == [version.name]  # the old version is gone


def versions(parent: Path) -> list[str]:
    return sorted(p.name for p in (parent / ".versions").iterdir() if p.is_dir())


def crash_while_writing(target: Path, content: bytes, module: str, function: str) -> None:
    """Write an artifact in a child process that dies (as if killed) at its first call of app.files' module.function:
    `os.replace` is the swap (a staged version and its link are left), `shutil.rmtree` the removal of the old
    version after it (the old version is left)."""
    import multiprocessing

    import app.files

    def child() -> None:
        setattr(getattr(app.files, module), function, lambda *args, **kwargs: os._exit(9))
        write_artifact(target, {"x": content}, {"model_id": "m"})

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    assert process.exitcode == 9


@pytest.mark.parametrize("module, function", [("os", "replace"), ("shutil", "rmtree")])
def test_a_write_cut_short_by_a_crash_is_cleaned_up_by_the_next_write(tmp_path, module, function) -> None:
    write_artifact(tmp_path / "a", {"x": b"v1"}, {"model_id": "m"})
    write_artifact(tmp_path / "a.b", {"x": b"other"}, {"model_id": "m"})  # its versions start with "a." too
    crash_while_writing(tmp_path / "a", b"v2", module, function)
    left = len(versions(tmp_path)) + len(list(tmp_path.glob(".*.link")))
    assert left > 2 and (tmp_path / "a" / "x").read_bytes() in (b"v1", b"v2")
    write_artifact(tmp_path / "a", {"x": b"v3"}, {"model_id": "m"})
    assert versions(tmp_path) == sorted(p.resolve().name for p in (tmp_path / "a", tmp_path / "a.b"))
    assert not list(tmp_path.glob(".*.link")) and (tmp_path / "a" / "x").read_bytes() == b"v3"
    assert (tmp_path / "a.b" / "x").read_bytes() == b"other"


def test_the_server_cleans_up_writes_cut_short_by_a_crash_when_it_starts(settings, runner) -> None:
    for root, name in ((settings.projection_dir, "p"), (settings.soft_prompt_dir, "s")):
        write_artifact(root / name, {"x": b"v1"}, {"model_id": "m"})
        crash_while_writing(root / name, b"v2", "os", "replace")
        assert len(versions(root)) == 2 and len(list(root.glob(".*.link"))) == 1
    with TestClient(create_app(settings, runner=runner)):
        for root, name in ((settings.projection_dir, "p"), (settings.soft_prompt_dir, "s")):
            assert versions(root) == [(root / name).resolve().name] and not list(root.glob(".*.link"))
            assert (root / name / "x").read_bytes() == b"v1"


def test_a_job_resumed_after_a_crash_reports_the_steps_it_ran(settings) -> None:
    (settings.data_dir / "wikitext-2").mkdir(parents=True)
    (settings.data_dir / "wikitext-2" / "valid.txt").write_text(corpus())
    runner = tiny_runner()
    config = ProjectionConfig(name="p", dim=8, steps=3, **SHAPE)
    job_dir = settings.cache_dir / "jobs" / "crashed"
    # the crash: every step ran and was checkpointed, the job record was last saved at step 0
    train_projection(runner, config, corpus(), settings.cache_dir / "scratch", checkpoint=job_dir / "checkpoint.pt")
    (job_dir / "job.json").write_text(json.dumps({"id": "crashed", "kind": "projection", "state": "running",
                                                  "config": config.model_dump(), "steps": 3}))
    manager = JobManager(runner, settings, on_artifact=lambda: None)
    manager.resume("crashed")
    job = manager.wait("crashed", timeout=120)
    manager.close()
    assert (job.state, job.step, len(job.losses)) == (JobState.succeeded, 3, 3)


# --- observability ----------------------------------------------------------------------------------------------


def test_veil_serve_logs_json_access_lines_and_not_uvicorns(settings, capsys) -> None:
    options = uvicorn_options(settings)
    assert options["access_log"] is False
    loggers = [logging.getLogger(name) for name in options["log_config"]["loggers"]]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    logging.config.dictConfig(options["log_config"])
    try:
        logging.getLogger("veil.access").info('{"route": "/v1/generate"}')
        assert capsys.readouterr().out == '{"route": "/v1/generate"}\n'
    finally:  # leave logging as the other tests expect it
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)  # (setLevel also clears the loggers' cached levels)


def test_the_mu_label_takes_only_a_fixed_set_of_values() -> None:
    metrics = Metrics()
    for mu in (3.87e-3, 0.7, 1.35e5, 49.99, 50.0, 50.01):
        metrics.received(36, 1, MechanismParams.from_mu(mu, bits=4, dim=8, clip=2.0))
    labels = {s.labels["mu"] for m in metrics.registry.collect() if m.name == "veil_private_requests"
              for s in m.samples if "mu" in s.labels}
    assert labels <= {f"{b:g}" for b in MU_BUCKETS} | {"+Inf"} and {"0.5", "1", "50", "100", "+Inf"} <= labels


def test_security_md_carries_the_red_team_table_its_results_give() -> None:
    from bench.abuse import RESULTS, TABLE, markdown

    results = json.loads(RESULTS.read_text())
    table = markdown(results)
    assert TABLE.read_text() == table and table in (REPO / "SECURITY.md").read_text()
    assert f"{results['passed']} of {len(results['rows'])} rows pass" in table
    assert results["passed"] == sum(r["pass"] for r in results["rows"])
