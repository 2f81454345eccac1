"""The red team's findings (issue 24), device side and the server's bound on A: the device trusts nothing it gets
from the server. Each test fails against the code before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from safetensors.numpy import save

from app.api import create_app
from app.keys import KeyStore, key_file
from client_sdk import AsyncPrivateLLMClient, BudgetLedger, BundleError, LedgerError, ProtocolError, bundle, wire
from client_sdk import client as client_module
from client_sdk.bundle import sha256_hex
from client_sdk.mechanism import MechanismParams, max_scale
from client_sdk.spans import as_messages
from tests.test_client import DIM, ID, POLICY, TEMPLATE, WORDS, FakeServer, make_client


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.mark.parametrize("mu", [1e-300, -1.0, 0.0])
def test_an_unusable_suggested_mu_is_a_bundle_error_and_nothing_is_sent(server, tmp_path, mu) -> None:
    server.info.defaults.mu = mu
    with pytest.raises(BundleError, match=f"suggests mu={mu:g}.*nothing was sent"):
        make_client(server, tmp_path).generate("paris")
    assert server.generate_requests() == []


def test_the_server_refuses_a_scale_the_mechanism_never_produces(settings, runner) -> None:
    with TestClient(create_app(settings, runner=runner)) as http:
        info = http.get("/v1/bundle").json()
        pid, dim, clip = info["defaults"]["projection_id"], info["projections"][0]["dim"], info["projections"][0]["clip"]

        def send(scale: float) -> int:
            params = MechanismParams(bits=4, dim=dim, clip=clip, scale=scale)
            body = wire.encode(wire.Payload(params, pid, np.zeros((2, dim), dtype=np.uint8)))
            return http.post("/v1/generate", params={"max_new_tokens": 1}, content=body,
                             headers={"content-type": "application/octet-stream"})

        refused = send(3e38)
        assert refused.status_code == 400 and "largest the mechanism produces" in refused.json()["detail"]
        assert send(max_scale(4, dim, clip)).status_code == 200  # the loosest A the SDK can produce still passes


def answer_generate_with(server, body: bytes, content_type: str = "text/event-stream") -> None:
    """Make the fake server answer every /v1/generate with `body` (set before the client is made)."""
    bundle_files = server.handle

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            server.requests.append(request)
            return httpx.Response(200, content=body, headers={"Content-Type": content_type})
        return bundle_files(request)

    server.handle = handle


MALFORMED_STREAMS = {
    "not JSON": b"data: not json\n\n",
    "a JSON list": b"data: [1, 2]\n\n",
    "text that is a number": b'data: {"text": 5}\n\n',
    "a final event missing fields": b'data: {"text": "x"}\n\nevent: done\ndata: {"text": "x"}\n\n',
    "no final event": b'data: {"text": "paris"}\n\n',
}


@pytest.mark.parametrize("body", MALFORMED_STREAMS.values(), ids=MALFORMED_STREAMS.keys())
def test_a_malformed_event_stream_is_a_protocol_error(server, tmp_path, body) -> None:
    answer_generate_with(server, body)
    with make_client(server, tmp_path) as client:
        with pytest.raises(ProtocolError, match="sent and its privacy charged"):
            list(client.generate("paris", stream=True))


def test_an_answer_that_is_not_an_event_stream_is_a_protocol_error(server, tmp_path) -> None:
    answer_generate_with(server, b"data: {}\n\n", "text/plain")
    with make_client(server, tmp_path) as client:
        with pytest.raises(ProtocolError, match="not an event stream"):
            list(client.generate("paris", stream=True))


@pytest.mark.parametrize("body", [b"not json", b'{"text": 1}', b"[]"])
def test_a_malformed_answer_is_a_protocol_error(server, tmp_path, body) -> None:
    answer_generate_with(server, body, "application/json")
    with make_client(server, tmp_path) as client:
        with pytest.raises(ProtocolError, match="not a valid generation"):
            client.generate("paris")


def test_the_async_client_reads_malformed_streams_as_protocol_errors(server, tmp_path) -> None:
    answer_generate_with(server, b"data: nope\n\n")

    async def run() -> None:
        async with AsyncPrivateLLMClient("http://fake", policy=POLICY, ledger=tmp_path / "ledger.db",
                                         cache_dir=tmp_path / "cache",
                                         transport=httpx.MockTransport(server.handle)) as client:
            stream = await client.generate("paris", stream=True)
            async for _ in stream:
                pass

    with pytest.raises(ProtocolError):
        asyncio.run(run())


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write: chmod 555, or (as root, who may write anyway) read-only /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif _writable("/sys"):
        pytest.skip("running as root with a writable /sys: no read-only folder to test with")
    else:
        yield Path("/sys")


def _writable(folder: str) -> bool:
    try:
        Path(folder, ".veil-probe").touch()
    except OSError:
        return False
    Path(folder, ".veil-probe").unlink()
    return True


def test_a_read_only_ledger_folder_is_a_ledger_error(read_only_folder, server, tmp_path) -> None:
    with pytest.raises(LedgerError, match="must be writable; nothing was sent"):
        BudgetLedger(read_only_folder / "ledger.db")
    with pytest.raises(LedgerError, match="cannot create the ledger's folder"):
        make_client(server, tmp_path, ledger=read_only_folder / "veil" / "ledger.db")
    assert server.generate_requests() == []


def charge(ledger: BudgetLedger, i: int) -> None:
    ledger.reserve("k", f"charge-{i}", 100.0, 1e-5)
    ledger.mark_sent(f"charge-{i}")


def test_restoring_an_older_ledger_is_detected(tmp_path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("k", total_epsilon=1000.0)
    charge(ledger, 0)
    shutil.copy(ledger.path, tmp_path / "backup.db")  # a device backup after one charge
    for i in range(1, 4):
        charge(ledger, i)
    assert ledger.spent("k").charges == 4
    shutil.copy(tmp_path / "backup.db", ledger.path)  # restored: one charge, epsilon 100 spent
    with pytest.raises(LedgerError, match="older copy of the ledger was restored"):
        ledger.reserve("k", "charge-4", 100.0, 1e-5)
    with pytest.raises(LedgerError, match="older copy of the ledger was restored"):
        BudgetLedger(ledger.path)


def test_restoring_an_older_limits_file_is_detected(tmp_path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("k", total_epsilon=1000.0)
    backup = ledger.limits_path.read_text()
    for i in range(2):
        charge(ledger, i)
    ledger.limits_path.write_text(backup)
    with pytest.raises(LedgerError, match="older copy of the limits file"):
        ledger.spent("k")


def test_a_crash_between_the_two_writes_is_repaired(tmp_path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("k", total_epsilon=1000.0)
    charge(ledger, 0)
    config = json.loads(ledger.limits_path.read_text())
    ledger.limits_path.write_text(json.dumps({**config, "generation": config["generation"] - 1}))  # file one behind
    charge(ledger, 1)
    assert BudgetLedger(ledger.path).spent("k").charges == 2
    assert json.loads(ledger.limits_path.read_text())["generation"] == config["generation"] + 2


def test_wrong_keys_from_one_address_do_not_lock_out_a_valid_key(settings, runner) -> None:
    settings.admin_key, settings.require_api_key = SecretStr("s3cret"), True
    _, good = KeyStore(key_file(settings)).create("app")
    with TestClient(create_app(settings, runner=runner)) as http:
        wrong = [http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_x"}).status_code
                 for _ in range(settings.auth_failures_per_minute + 1)]
        assert wrong == [403] * settings.auth_failures_per_minute + [429]
        assert http.get("/v1/bundle", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert http.get("/admin/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_y"}).status_code == 429


HOSTILE_TEMPLATES = {
    "a long loop": "{% for i in range(20000) %}hello {% endfor %}" + TEMPLATE,
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + TEMPLATE,
    "one character changed": TEMPLATE.replace("assistant", "assistent"),
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_template_the_sdk_does_not_ship_is_never_rendered(server, tmp_path, template) -> None:
    server.info.chat_template = template
    with make_client(server, tmp_path) as client:
        with pytest.raises(BundleError, match="not one this SDK renders"):
            client.generate("paris")
        assert client.generate("paris", chat=False).text == "paris"  # without a template the bundle still works
    assert len(server.generate_requests()) == 1


def test_the_app_may_vet_a_template_and_the_device_renders_its_own_copy(server, tmp_path) -> None:
    vetted = TEMPLATE.replace("assistant", "system")
    server.info.chat_template = vetted
    with make_client(server, tmp_path, chat_templates=[vetted]) as client:
        spans = client.bundle.spans(as_messages("paris"))
    assert [int(i) for s in spans if not s.private for i in s.ids][-1] == ID["system"]


def serve_table(server, content: bytes) -> None:
    """Make the fake server's bundle offer `content` as its projected table (hash and id to match)."""
    sha = sha256_hex(content)
    server.table_bytes = content
    server.info.projections[0] = server.info.projections[0].model_copy(
        update={"id": sha[:16], "table_sha256": sha, "table_url": f"/v1/bundle/projections/{sha[:16]}"})
    server.info.defaults.projection_id = sha[:16]


DOCTORED_TABLES = {
    "not safetensors": lambda: b"\x00" * 64,
    "a NaN in the table": lambda: save({"table": np.full((len(WORDS), DIM), np.nan, dtype=np.float16)}),
    "no tensor named table": lambda: save({"other": np.zeros((len(WORDS), DIM), dtype=np.float16)}),
}


@pytest.mark.parametrize("make", DOCTORED_TABLES.values(), ids=DOCTORED_TABLES.keys())
def test_a_doctored_table_is_a_bundle_error(server, tmp_path, make) -> None:
    serve_table(server, make())
    with make_client(server, tmp_path) as client, pytest.raises(BundleError):
        client.generate("paris")
    assert server.generate_requests() == []


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b'{"not": "a tokenizer"}'])
def test_a_doctored_tokenizer_is_a_bundle_error(server, tmp_path, content) -> None:
    server.tokenizer_bytes, server.info.tokenizer_sha256 = content, sha256_hex(content)
    with make_client(server, tmp_path) as client, pytest.raises(BundleError, match="not a tokenizer"):
        client.generate("paris")


def test_a_tokenizer_larger_than_the_table_is_a_bundle_error(server, tmp_path) -> None:
    server.info.vocab_size -= 1
    serve_table(server, save({"table": np.zeros((len(WORDS) - 1, DIM), dtype=np.float16)}))
    with make_client(server, tmp_path) as client, pytest.raises(BundleError, match="more than the bundle's"):
        client.generate("paris")


@pytest.mark.parametrize("declared", [True, False], ids=["Content-Length", "chunked"])
@pytest.mark.parametrize("what", ["bundle", "tokenizer", "table"])
def test_downloads_are_refused_past_their_size_limit_before_they_are_read(server, tmp_path, monkeypatch, what,
                                                                        declared) -> None:
    limit, sent = 4096, []
    monkeypatch.setattr(bundle, {"bundle": "MAX_BUNDLE_INFO_BYTES", "tokenizer": "MAX_TOKENIZER_BYTES",
                                 "table": "MAX_TABLE_BYTES"}[what], limit)
    monkeypatch.setattr(client_module, "MAX_BUNDLE_INFO_BYTES", bundle.MAX_BUNDLE_INFO_BYTES)
    path = {"bundle": "/v1/bundle", "tokenizer": server.info.tokenizer_url,
            "table": server.info.projections[0].table_url}[what]
    files = server.handle

    def chunks() -> Iterator[bytes]:
        for _ in range(1000):  # 64 MiB unless the client stops reading
            sent.append(1)
            yield b"x" * 65536

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != path:
            return files(request)
        if declared:
            return httpx.Response(200, headers={"Content-Length": str(64 << 20)}, stream=httpx.ByteStream(b""))
        return httpx.Response(200, content=chunks())

    server.handle = handle
    with make_client(server, tmp_path) as client, pytest.raises(BundleError, match="over the limit of 4096 bytes"):
        client.generate("paris")
    assert len(sent) <= 1


@pytest.mark.parametrize("declared", [True, False], ids=["Content-Length", "chunked"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "event stream"])
def test_an_answer_past_its_size_limit_is_refused_as_it_arrives(server, tmp_path, monkeypatch, stream,
                                                                 declared) -> None:
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 4096)
    sent = []
    files = server.handle

    def chunks() -> Iterator[bytes]:
        yield b"data: " if stream else b'{"text": "'
        for _ in range(1000):  # 64 MiB of one line unless the client stops reading
            sent.append(1)
            yield b"x" * 65536

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/generate":
            return files(request)
        kind = {"Content-Type": "text/event-stream" if stream else "application/json"}
        if declared:
            return httpx.Response(200, headers={**kind, "Content-Length": str(64 << 20)}, stream=httpx.ByteStream(b""))
        return httpx.Response(200, headers=kind, content=chunks())

    server.handle = handle
    with make_client(server, tmp_path) as client, pytest.raises(ProtocolError, match="over the limit of 4096 bytes"):
        answer = client.generate("paris", stream=stream)
        list(answer) if stream else answer
    assert len(sent) <= 1
