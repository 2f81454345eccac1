"""The clients against an in-process fake server (httpx.MockTransport) built from a random projection."""

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save
from tokenizers import Tokenizer, models, pre_tokenizers

from client_sdk import (AsyncPrivateLLMClient, BudgetExceededError, BudgetLedger, BundleError, PrivateLLMClient,
                        ServerError, wire)
from client_sdk.bundle import sha256_hex
from client_sdk.schemas import BundleInfo, GenerateResponse, MechanismDefaults, ProjectionInfo

WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "the", "capital", "of", "france", "is", "paris"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
DIM = 16


class FakeServer:
    """Serves a bundle built from a random matrix and answers /v1/generate by decoding the payload."""

    def __init__(self) -> None:
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        self.tokenizer_bytes = tokenizer.to_str().encode()
        table = np.random.default_rng(0).normal(scale=0.05, size=(len(WORDS), DIM)).astype(np.float16)
        self.table_bytes = save({"table": table})
        pid = sha256_hex(self.table_bytes)[:16]
        self.info = BundleInfo(
            model_id="fake", vocab_size=len(WORDS), hidden_size=64, wire_version=wire.VERSION, max_prompt_tokens=64,
            tokenizer_url="/v1/bundle/tokenizer.json", tokenizer_sha256=sha256_hex(self.tokenizer_bytes),
            chat_template=TEMPLATE,
            projections=[ProjectionInfo(id=pid, dim=DIM, clip=0.05, table_url=f"/v1/bundle/projections/{pid}",
                                        table_sha256=sha256_hex(self.table_bytes))],
            defaults=MechanismDefaults(projection_id=pid, bits=4, mu=5.0),
        )
        self.requests: list[httpx.Request] = []
        self.received: list[wire.Payload] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/bundle":
            return httpx.Response(200, json=self.info.model_dump())
        if path == self.info.tokenizer_url:
            return httpx.Response(200, content=self.tokenizer_bytes)
        if path == self.info.projections[0].table_url:
            return httpx.Response(200, content=self.table_bytes)
        if path == "/v1/generate":
            try:
                payload = wire.decode(request.content, projections={self.info.projections[0].id: DIM})
            except wire.WireFormatError as err:
                return httpx.Response(400, json={"error": "bad_payload", "detail": str(err)})
            self.received.append(payload)
            answer = GenerateResponse(text="paris", prompt_tokens=payload.tokens, completion_tokens=1, timings={})
            if request.url.params.get("stream") == "true":
                body = (f"data: {json.dumps({'text': 'par'})}\n\ndata: {json.dumps({'text': 'is'})}\n\n"
                        f"event: done\ndata: {answer.model_dump_json()}\n\n")
                return httpx.Response(200, content=body.encode(), headers={"Content-Type": "text/event-stream"})
            return httpx.Response(200, json=answer.model_dump())
        return httpx.Response(404, json={"error": "not_found", "detail": path})

    def generate_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/v1/generate"]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def make_client(server: FakeServer, tmp_path: Path, **kwargs: object) -> PrivateLLMClient:
    return PrivateLLMClient("http://fake", transport=httpx.MockTransport(server.handle),
                            cache_dir=tmp_path / "cache", **kwargs)


def test_generate_sends_exactly_the_codec_bytes_and_reports_privacy(server: FakeServer, tmp_path: Path) -> None:
    with make_client(server, tmp_path, mu=5.0, bits=4) as client:
        result = client.generate("the capital of france is", max_new_tokens=5)
    sent = server.generate_requests()[0]
    payload = server.received[0]
    # the chat template wraps the prompt: im_start user the capital of france is im_end im_start assistant
    assert payload.tokens == 10
    assert len(sent.content) == result.bytes_sent == wire.payload_size(10, DIM, 4)
    assert sent.headers["content-type"] == "application/octet-stream"
    assert result.text == "paris" and result.privacy.tokens == 10
    assert result.privacy.epsilon > result.privacy.epsilon_per_token > 0
    assert payload.params.mu_clt == pytest.approx(5.0, rel=1e-6)
    assert sent.url.params["max_new_tokens"] == "5"


def test_bundle_files_are_cached_by_hash(server: FakeServer, tmp_path: Path) -> None:
    make_client(server, tmp_path).bundle
    downloads = len(server.requests)
    make_client(server, tmp_path).bundle
    assert len(server.requests) == downloads + 1  # only the metadata again


def test_a_tampered_table_is_refused(server: FakeServer, tmp_path: Path) -> None:
    server.table_bytes = server.table_bytes[:-2] + b"\x00\x01"
    with pytest.raises(BundleError, match="SHA-256"):
        make_client(server, tmp_path).bundle


def test_over_budget_is_refused_before_any_byte_leaves(server: FakeServer, tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("default", total_epsilon=1000.0)
    with make_client(server, tmp_path, mu=5.0, ledger=ledger) as client:
        first = client.generate("the capital of france is")
        assert ledger.spent("default").epsilon == pytest.approx(first.privacy.epsilon)
        while ledger.spent("default").epsilon + first.privacy.epsilon <= 1000.0:
            client.generate("the capital of france is")
        sent_before = len(server.generate_requests())
        with pytest.raises(BudgetExceededError):
            client.generate("the capital of france is")
    assert len(server.generate_requests()) == sent_before
    assert ledger.pending("default") == []


def test_streaming_yields_chunks_then_the_result(server: FakeServer, tmp_path: Path) -> None:
    with make_client(server, tmp_path) as client:
        stream = client.generate("paris", stream=True)
        assert "".join(stream) == "paris"
    assert stream.result is not None and stream.result.prompt_tokens == 6


def test_server_errors_become_typed_errors(server: FakeServer, tmp_path: Path) -> None:
    server.info.projections[0].clip = 0.0  # the client builds a mechanism the server's decoder refuses
    with pytest.raises((ValueError, ServerError)):
        make_client(server, tmp_path).generate("paris")


def test_prompt_over_the_server_limit_is_refused_locally(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="over the server's limit"):
        make_client(server, tmp_path).generate("paris " * 100)
    assert server.generate_requests() == []


def test_async_client(server: FakeServer, tmp_path: Path) -> None:
    async def run() -> tuple[str, str, int]:
        async with AsyncPrivateLLMClient("http://fake", transport=httpx.MockTransport(server.handle),
                                         cache_dir=tmp_path / "cache", mu=2.0, bits=2) as client:
            plain = await client.generate("the capital of france is")
            stream = await client.generate("paris", stream=True)
            chunks = [c async for c in stream]
            return plain.text, "".join(chunks), stream.result.bytes_sent

    plain, streamed, sent = asyncio.run(run())
    assert plain == streamed == "paris" and sent == wire.payload_size(6, DIM, 2)
    assert server.received[0].params.bits == 2
