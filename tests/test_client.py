"""The clients against an in-process fake server (httpx.MockTransport) built from a random projection."""

import asyncio
import dataclasses
import json
import multiprocessing
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
from safetensors.numpy import save
from tokenizers import Tokenizer, models, pre_tokenizers

from client_sdk import (AsyncPrivateLLMClient, BudgetExceededError, BudgetLedger, BundleError, Conversation, Part,
                        PolicyError, PrivacyPolicy, PrivateLLMClient, ProtocolError, ServerError, VeilError,
                        default_ledger_path, markup, privacy_report, wire)
from client_sdk import bundle as bundle_module
from client_sdk import client as client_module
from client_sdk.budget import Limits
from client_sdk.bundle import ClientBundle, sha256_hex
from client_sdk.client import MAX_ANSWER_BYTES, AsyncGenerationStream, GenerationResult, PreparedPrompt
from client_sdk.mechanism import MechanismParams
from client_sdk.policy import epsilon_per_token
from client_sdk.schemas import BundleInfo, GenerateResponse, MechanismDefaults, ProjectionInfo

WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "the", "capital", "of", "france",
         "is", "paris", "[", "]", "PERSON_1", "CITY_1", "hello"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
DIM, CLIP = 16, 0.05
ID = {w: i for i, w in enumerate(WORDS)}
# The policy of these tests: exactly the per-token epsilon of the fake server's suggested mu = 5.
POLICY = PrivacyPolicy(epsilon_per_token=epsilon_per_token(MechanismParams.from_mu(5.0, bits=4, dim=DIM, clip=CLIP),
                                                           1e-5))


class FakeServer:
    """Serves a bundle built from a random matrix and answers /v1/generate by decoding the payload."""

    def __init__(self) -> None:
        tokenizer = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
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
            projections=[ProjectionInfo(id=pid, dim=DIM, clip=CLIP, table_url=f"/v1/bundle/projections/{pid}",
                                        table_sha256=sha256_hex(self.table_bytes))],
            defaults=MechanismDefaults(projection_id=pid, bits=4, mu=5.0),
        )
        self.decode_dim = DIM
        self.more_tables: dict[str, bytes] = {}  # table URL -> file, for projections added after the first
        self.chunks = ["par", "is"]
        self.stream_error: dict | None = None
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
        if path in self.more_tables:
            return httpx.Response(200, content=self.more_tables[path])
        if path == "/v1/generate":
            dims = {p.id: p.dim for p in self.info.projections} | {self.info.projections[0].id: self.decode_dim}
            try:
                payload = wire.decode(request.content, projections=dims, vocab_size=len(WORDS))
            except wire.WireFormatError as err:
                return httpx.Response(400, json={"error": "bad_payload", "detail": str(err)})
            self.received.append(payload)
            text = "".join(self.chunks)
            answer = GenerateResponse(text=text, prompt_tokens=payload.tokens, completion_tokens=1, timings={})
            if request.url.params.get("stream") == "true":
                body = "".join(f"data: {json.dumps({'text': c})}\n\n" for c in self.chunks)
                if self.stream_error:
                    body += f"event: error\ndata: {json.dumps(self.stream_error)}\n\n"
                body += f"event: done\ndata: {answer.model_dump_json()}\n\n"
                return httpx.Response(200, content=body.encode(), headers={"Content-Type": "text/event-stream"})
            return httpx.Response(200, json=answer.model_dump())
        return httpx.Response(404, json={"error": "not_found", "detail": path})

    def add_projection(self, dim: int, clip: float) -> str:
        """Serve a second projected table (not the default); returns its id."""
        table = np.random.default_rng(dim).normal(scale=clip, size=(len(WORDS), dim)).astype(np.float16)
        content = save({"table": table})
        pid = sha256_hex(content)[:16]
        url = f"/v1/bundle/projections/{pid}"
        self.more_tables[url] = content
        self.info.projections.append(ProjectionInfo(id=pid, dim=dim, clip=clip, table_url=url,
                                                    table_sha256=sha256_hex(content)))
        return pid

    def generate_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/v1/generate"]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


class BlockingStream:
    """An `AsyncGenerationStream` iterated from synchronous code on its client's event loop."""

    def __init__(self, stream: AsyncGenerationStream, runner: asyncio.Runner) -> None:
        self.stream, self.runner = stream, runner

    def __iter__(self) -> Iterator[str]:
        chunks = aiter(self.stream)

        async def next_chunk() -> str:
            return await anext(chunks)

        while True:
            try:
                yield self.runner.run(next_chunk())
            except StopAsyncIteration:
                return

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


class BlockingAsyncClient:
    """`AsyncPrivateLLMClient` driven from synchronous code on one event loop, so that one test covers both clients."""

    def __init__(self, client: AsyncPrivateLLMClient) -> None:
        self.client, self.runner = client, asyncio.Runner()

    @property
    def ledger(self) -> BudgetLedger | None:
        return self.client.ledger

    @property
    def policy(self) -> PrivacyPolicy:
        return self.client.policy

    @property
    def bundle(self) -> ClientBundle:
        return self.runner.run(self.client.get_bundle())

    def prepare(self, prompt: object, **kwargs: object) -> PreparedPrompt:
        return self.runner.run(self.client.prepare(prompt, **kwargs))

    def generate(self, prompt: object, **kwargs: object) -> GenerationResult | BlockingStream:
        result = self.runner.run(self.client.generate(prompt, **kwargs))
        return BlockingStream(result, self.runner) if isinstance(result, AsyncGenerationStream) else result

    def __enter__(self) -> "BlockingAsyncClient":
        assert self.runner.run(self.client.__aenter__()) is self.client
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.run(self.client.__aexit__(*exc))
        self.runner.close()


KINDS = ["sync", "async"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Run the test with the synchronous, then the asynchronous client."""
    return request.param


def make_client(server: FakeServer, tmp_path: Path, kind: str = "sync", transport: httpx.MockTransport | None = None,
                **kwargs: object) -> PrivateLLMClient | BlockingAsyncClient:
    """A client of `kind` ("sync" or "async") talking to `server` (or through `transport`)."""
    kwargs = {"policy": POLICY, "ledger": tmp_path / "ledger.db", "cache_dir": tmp_path / "cache", **kwargs}
    transport = transport or httpx.MockTransport(server.handle)
    if kind == "sync":
        return PrivateLLMClient("http://fake", transport=transport, **kwargs)
    return BlockingAsyncClient(AsyncPrivateLLMClient("http://fake", transport=transport, **kwargs))


def test_the_template_is_public_the_message_private_and_only_private_tokens_are_charged(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        result = client.generate("the capital of france is", max_new_tokens=5)
        spent = client.ledger.spent("default")
    sent = server.generate_requests()[0]
    payload = wire.decode(sent.content, vocab_size=len(WORDS))
    # <|im_start|> user | the capital of france is | <|im_end|> <|im_start|> assistant
    assert [(s.private, s.length) for s in payload.spans] == [(False, 2), (True, 5), (False, 3)]
    assert payload.public_ids.tolist() == [ID["<|im_start|>"], ID["user"], ID["<|im_end|>"], ID["<|im_start|>"],
                                           ID["assistant"]]
    assert len(sent.content) == result.bytes_sent == wire.payload_size(5, DIM, 4, public=5, spans=3)
    assert sent.headers["content-type"] == "application/octet-stream"
    assert (result.privacy.private_tokens, result.privacy.public_tokens) == (5, 5)
    assert result.privacy.epsilon == pytest.approx(privacy_report(payload.params, 5).epsilon)
    assert spent.epsilon == pytest.approx(result.privacy.epsilon) and spent.private_tokens == 5
    assert payload.params.mu_clt == pytest.approx(5.0, rel=1e-6)  # the suggestion fits the policy: used


def test_public_spans_are_sent_in_the_clear_and_never_charged(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        public = client.generate([{"role": "user", "content": "the capital of france is", "public": True}])
        assert client.ledger.spent("default").charges == 0 and public.privacy.epsilon == 0
        selective = client.generate([{"role": "user", "content": markup("the capital of [[france]] is")}])
        spent = client.ledger.spent("default")
    payloads = [wire.decode(r.content) for r in server.generate_requests()]
    assert payloads[0].private_tokens == 0 and ID["france"] in payloads[0].public_ids
    assert payloads[1].private_tokens == 1 and ID["france"] not in payloads[1].public_ids
    assert ID["capital"] in payloads[1].public_ids
    assert selective.privacy.epsilon == pytest.approx(selective.privacy.epsilon_per_token)
    assert spent.charges == 1 and spent.epsilon == pytest.approx(selective.privacy.epsilon_per_token)


def test_private_spans_are_never_sent_in_the_clear(server, tmp_path, kind) -> None:
    secret = ["france", "paris"]
    content = [("the capital of", False), ("france", True), ("is", False), ("paris", True)]
    with make_client(server, tmp_path, kind) as client:
        client.generate([{"role": "user", "content": content}])
    body = server.generate_requests()[0].content
    payload = wire.decode(body)
    assert payload.private_tokens == 2 and not set(payload.public_ids.tolist()) & {ID[w] for w in secret}
    assert [s.private for s in payload.spans] == [False, True, False, True, False]
    # the private spans are levels: n bits per coordinate, nothing else
    assert payload.levels.shape == (2, DIM) and payload.levels.max() <= payload.params.levels


def test_placeholders_never_leave_the_device_and_are_restored(server, tmp_path, kind) -> None:
    server.chunks = ["hello [PER", "SON_1] is in [", "CITY_1", "]"]
    parts = [Part("paris", "placeholder", "PERSON"), ("is in", False), Part("france", "placeholder", "CITY")]
    with make_client(server, tmp_path, kind) as client:
        plain = client.generate([{"role": "user", "content": parts}])
        stream = client.generate([{"role": "user", "content": parts}], stream=True)
        chunks = list(stream)
        assert client.ledger.spent("default").charges == 0  # placeholders are public: nothing charged
    for request in server.generate_requests():
        payload = wire.decode(request.content)
        assert payload.private_tokens == 0
        assert not {ID["paris"], ID["france"]} & set(payload.public_ids.tolist())
        assert {ID["PERSON_1"], ID["CITY_1"], ID["["]} <= set(payload.public_ids.tolist())
    assert plain.text == "hello paris is in france" == "".join(chunks) == stream.result.text
    assert all("[" not in c for c in chunks)  # a placeholder split across chunks is held back, then restored


def test_a_conversation_keeps_its_values_off_the_wire_in_later_public_turns(server, tmp_path, kind) -> None:
    server.chunks = ["hello [PER", "SON_1]"]
    conversation = Conversation()
    with make_client(server, tmp_path, kind) as client:
        first = client.generate([{"role": "user", "content": [Part("paris", "placeholder", "PERSON")]}],
                                conversation=conversation)
        assert first.text == "hello paris"
        later = [{"role": "assistant", "content": first.text, "public": True},
                 {"role": "user", "content": "hello", "public": True}]
        assert client.generate(later, conversation=conversation).text == "hello paris"
        client.generate(later)  # without the conversation, the restored value goes out in the clear
    with_conversation, without = (wire.decode(r.content).public_ids.tolist() for r in server.generate_requests()[1:])
    assert ID["paris"] not in with_conversation and ID["PERSON_1"] in with_conversation
    assert ID["paris"] in without


def test_detection_is_one_argument_away_and_the_whole_message_stays_the_default(server, tmp_path, kind) -> None:
    prompt = "hello ann@example.com and 4111 1111 1111 1111"
    with make_client(server, tmp_path, kind) as client:
        whole = client.prepare(prompt)
        detected = client.prepare(prompt, private="detect")
        sent = client.generate(prompt, private="detect")
        with pytest.raises(ValueError):
            client.prepare(prompt, private="names")
    assert whole.report.private_tokens > 0 and whole.conversation.originals == {}
    assert detected.conversation.originals == {"[EMAIL_1]": "ann@example.com", "[CARD_1]": "4111 1111 1111 1111"}
    assert detected.report.private_tokens == sent.privacy.private_tokens == server.received[0].private_tokens == 0
    policy = dataclasses.replace(POLICY, private="detect", treatments={"EMAIL": "noise", "CARD": "placeholder"})
    with make_client(server, tmp_path, kind, policy=policy) as client:
        by_policy = client.prepare(prompt)
    assert by_policy.conversation.originals == {"[CARD_1]": "4111 1111 1111 1111"}
    assert 0 < by_policy.report.private_tokens < whole.report.private_tokens


def test_multi_turn_messages_round_trip(server, tmp_path, kind) -> None:
    messages = [{"role": "system", "content": "hello", "public": True},
                {"role": "user", "content": "the capital of france is"},
                {"role": "assistant", "content": "paris"},
                {"role": "user", "content": [("the capital", False), ("of france", True)]}]
    with make_client(server, tmp_path, kind) as client:
        result = client.generate(messages)
        expected = client.bundle.tokenize(messages).tolist()
    payload = server.received[0]
    rebuilt, private_positions = [], []
    for span, data in payload.segments():
        if span.private:
            private_positions += range(len(rebuilt), len(rebuilt) + span.length)
            rebuilt += [None] * span.length
        else:
            rebuilt += data.tolist()
    assert len(rebuilt) == len(expected) == payload.tokens
    assert all(r == e for r, e in zip(rebuilt, expected) if r is not None)
    assert [expected[i] for i in private_positions] == [ID[w] for w in "the capital of france is paris of france".split()]
    assert result.privacy.private_tokens == 8 and ID["system"] in payload.public_ids


def test_a_looser_server_suggestion_is_refused(server, tmp_path, kind) -> None:
    server.info.defaults.mu = 50.0
    with pytest.raises(PolicyError, match="looser"):
        make_client(server, tmp_path, kind).generate("paris")
    assert server.generate_requests() == []
    with pytest.raises(PolicyError):
        make_client(server, tmp_path, kind, mu=6.0).generate("paris")  # the app's own mu must fit too
    with make_client(server, tmp_path, kind, allow_looser_bundle=True) as client:
        result = client.generate("paris")
    assert result.privacy.mu_clt <= 5.0 + 1e-6 and result.privacy.epsilon_per_token <= POLICY.epsilon_per_token


def test_the_default_ledger_exists_after_the_first_call_and_survives_a_restart(server, tmp_path, kind,
                                                                                private_data_dir) -> None:
    path = default_ledger_path()
    # where every version looks for it (a moved ledger would start again from zero); the autouse fixture isolates it
    assert path == private_data_dir / "veil" / "ledger.db" and not path.exists()
    with make_client(server, tmp_path, kind, ledger=None) as client:
        first = client.generate("the capital of france is")
    assert path.exists()
    with make_client(server, tmp_path, kind, ledger=None) as client:  # a restart: a new client, a new ledger object
        assert client.ledger.spent("default").epsilon == pytest.approx(first.privacy.epsilon)
    assert BudgetLedger(path).limits("default").total_epsilon == POLICY.epsilon_total


def test_bundle_files_are_cached_by_hash_and_reverified(server, tmp_path, kind) -> None:
    make_client(server, tmp_path, kind).bundle
    downloads = len(server.requests)
    make_client(server, tmp_path, kind).bundle
    assert len(server.requests) == downloads + 1  # only the metadata again
    (tmp_path / "cache" / server.info.projections[0].table_sha256).write_bytes(b"tampered")
    make_client(server, tmp_path, kind).bundle
    assert len(server.requests) == downloads + 3  # metadata and the corrupted table again


def test_a_tampered_table_is_refused(server, tmp_path, kind) -> None:
    server.table_bytes = server.table_bytes[:-2] + b"\x00\x01"
    with pytest.raises(BundleError, match=f"^projected table {server.info.projections[0].id}: SHA-256"):
        make_client(server, tmp_path, kind).bundle


def test_a_bundle_file_over_its_size_cap_is_refused(server, tmp_path, kind, monkeypatch) -> None:
    monkeypatch.setattr(bundle_module, "MAX_TABLE_BYTES", len(server.table_bytes) - 1)
    with pytest.raises(BundleError, match="projected table"):
        make_client(server, tmp_path, kind).bundle


@pytest.mark.parametrize("url", ["http://evil.example/table", "https://fake/table", "http://fake:8080/table",
                                 "//evil.example/table"])
def test_bundle_urls_off_the_servers_origin_are_refused(server, tmp_path, kind, url) -> None:
    server.info.projections[0].table_url = url
    with pytest.raises(BundleError, match="origin"):
        make_client(server, tmp_path, kind, api_key="secret").bundle
    assert all(r.url.host == "fake" and r.url.port is None for r in server.requests)


@pytest.mark.parametrize("sha", ["../" * 20 + "etc/passwd", "ab" * 31 + "c", "ab" * 32 + "c", "AB" * 32, "ab" * 32 + "\n"])
def test_bundle_hashes_must_be_64_lowercase_hex_characters(server, tmp_path, kind, sha) -> None:
    server.info.tokenizer_sha256 = sha
    with pytest.raises(BundleError, match="not a SHA-256"):
        make_client(server, tmp_path, kind).bundle
    assert [r.url.path for r in server.requests] == ["/v1/bundle"]  # refused before any file is fetched


def test_over_budget_is_refused_before_any_byte_leaves(server, tmp_path, kind) -> None:
    one = privacy_report(MechanismParams.from_mu(5.0, bits=4, dim=DIM, clip=CLIP), 5).epsilon
    policy = PrivacyPolicy(epsilon_per_token=POLICY.epsilon_per_token, epsilon_total=3.5 * one)
    with make_client(server, tmp_path, kind, policy=policy) as client:
        answered = 0
        with pytest.raises(BudgetExceededError, match="composed"):
            for _ in range(10):
                client.generate("the capital of france is")
                answered += 1
        assert client.ledger.pending("default") == []
        charges = client.ledger.spent("default").charges
    # the refused prompt sent nothing: the server saw exactly the prompts that were answered, each charged once
    assert len(server.generate_requests()) == answered == charges
    # composition is tighter than adding: more than 3 prompts of epsilon `one` fit under 3.5 * one
    assert answered > 3


def test_a_prompt_over_the_per_prompt_cap_sends_nothing(server, tmp_path, kind) -> None:
    policy = PrivacyPolicy(epsilon_per_token=POLICY.epsilon_per_token, epsilon_per_prompt=POLICY.epsilon_per_token)
    with make_client(server, tmp_path, kind, policy=policy) as client:
        with pytest.raises(BudgetExceededError, match="per-prompt"):
            client.generate("the capital of france is")
        assert client.ledger.spent("default").charges == 0
    assert server.generate_requests() == []


def failing_send(server: FakeServer, error: type[httpx.TransportError]):
    """The fake server's handler, except that /v1/generate fails with `error` (after reading the request)."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            request.read()
            raise error("simulated", request=request)
        return server.handle(request)
    return handle


# Only a refused connection proves the payload never left; past that (a timeout, a dropped connection) it may have
# reached the server, so its charge stays.
SEND_FAILURES = [(httpx.ConnectError, 0), (httpx.ReadTimeout, 1), (httpx.WriteTimeout, 1), (httpx.ReadError, 1),
                 (httpx.RemoteProtocolError, 1)]


@pytest.mark.parametrize(("error", "charges"), SEND_FAILURES)
def test_a_failed_send_releases_the_charge_only_when_nothing_can_have_left(server, tmp_path, error, charges) -> None:
    with PrivateLLMClient("http://fake", transport=httpx.MockTransport(failing_send(server, error)), policy=POLICY,
                          cache_dir=tmp_path / "cache", ledger=tmp_path / "l.db") as client:
        with pytest.raises((httpx.HTTPError, VeilError)):
            client.generate("the capital of france is")
        assert client.ledger.spent("default").charges == charges


@pytest.mark.parametrize(("error", "charges"), SEND_FAILURES)
def test_the_async_client_releases_the_charge_only_when_nothing_can_have_left(server, tmp_path, error,
                                                                               charges) -> None:
    async def run() -> int:
        async with AsyncPrivateLLMClient("http://fake", transport=httpx.MockTransport(failing_send(server, error)),
                                         policy=POLICY, cache_dir=tmp_path / "cache",
                                         ledger=tmp_path / "l.db") as client:
            with pytest.raises((httpx.HTTPError, VeilError)):
                await client.generate("the capital of france is")
            return client.ledger.spent("default").charges

    assert asyncio.run(run()) == charges


def test_a_seeded_client_privatizes_reproducibly_and_an_unseeded_one_does_not(server, tmp_path, kind) -> None:
    def payload(seed: int | None) -> bytes:
        return make_client(server, tmp_path, kind, seed=seed).prepare("the capital of france is").payload

    assert payload(0) == payload(0) != payload(6)
    assert payload(None) != payload(None)


def test_a_prompt_without_a_template_is_private_throughout(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        prepared = client.prepare("the capital of france is", chat=False)
        result = client.generate("the capital of france is", chat=False)
        templated = client.prepare("the capital of france is")  # chat is the default
    assert (prepared.report.private_tokens, prepared.report.public_tokens) == (5, 0)
    assert (templated.report.private_tokens, templated.report.public_tokens) == (5, 5)
    received = server.received[-1]
    assert (received.private_tokens, received.public_tokens, result.prompt_tokens) == (5, 0, 5)
    assert len(received.spans) == 1


def test_streaming_yields_chunks_then_the_result(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        stream = client.generate("paris", stream=True)
        # what it cost is known before the first chunk
        assert (stream.privacy.private_tokens, stream.bytes_sent) == (1, len(server.generate_requests()[0].content))
        assert "".join(stream) == "paris"
    assert stream.result is not None and stream.result.prompt_tokens == 6


def test_server_errors_become_typed_errors(server, tmp_path, kind) -> None:
    server.decode_dim = DIM + 1  # the server's decoder refuses what the client sends: a 400
    with pytest.raises(ServerError) as caught:
        make_client(server, tmp_path, kind).generate("paris")
    assert caught.value.status_code == 400 and "does not match" in caught.value.detail


def test_prompt_over_the_server_limit_is_refused_locally(server, tmp_path, kind) -> None:
    with pytest.raises(ValueError, match="over the server's limit"):
        make_client(server, tmp_path, kind).generate("paris " * 100)
    assert server.generate_requests() == []


def test_async_client(server, tmp_path) -> None:
    server.chunks = ["hello [PER", "SON_1]"]

    async def run() -> tuple[str, str, int]:
        async with AsyncPrivateLLMClient("http://fake", transport=httpx.MockTransport(server.handle),
                                         cache_dir=tmp_path / "cache", policy=POLICY, ledger=tmp_path / "l.db",
                                         mu=2.0, bits=2) as client:
            parts = [Part("paris", "placeholder", "PERSON")]
            plain = await client.generate([{"role": "user", "content": parts}])
            stream = await client.generate([{"role": "user", "content": parts}], stream=True)
            chunks = [c async for c in stream]
            return plain.text, "".join(chunks), stream.result.bytes_sent

    plain, streamed, sent = asyncio.run(run())
    assert plain == streamed == "hello paris" and sent == wire.payload_size(0, DIM, 2, public=8, spans=1)
    assert server.received[0].params == MechanismParams.from_mu(2.0, bits=2, dim=DIM, clip=CLIP)


def test_both_clients_pass_on_their_settings(server, tmp_path) -> None:
    """The key, mu, bits and projection given to either client are the ones used."""
    pid = server.info.projections[0].id
    settings = dict(api_key="k-123", mu=50.0, bits=3, projection_id=pid, policy=PrivacyPolicy(epsilon_per_token=1e9),
                    cache_dir=tmp_path / "cache", ledger=False, transport=httpx.MockTransport(server.handle))
    with PrivateLLMClient("http://fake", **settings) as client:
        client.generate("the capital of france is")

    async def run() -> None:
        async with AsyncPrivateLLMClient("http://fake", **settings) as client:
            await client.generate("the capital of france is")

    asyncio.run(run())
    expected = MechanismParams.from_mu(50.0, bits=3, dim=DIM, clip=CLIP)
    assert [(p.params, p.projection_id) for p in server.received] == [(expected, pid)] * 2
    assert {r.headers.get("authorization") for r in server.requests} == {"Bearer k-123"}


def test_an_error_event_mid_stream_raises_a_server_error(server, tmp_path, kind) -> None:
    server.stream_error = {"error": "generation_failed", "detail": "the engine stopped"}
    with make_client(server, tmp_path, kind) as client:
        stream = client.generate("paris", stream=True)
        assert stream.result is None
        with pytest.raises(ServerError) as caught:
            list(stream)
    assert (caught.value.status_code, caught.value.detail, caught.value.kind) == (200, "the engine stopped",
                                                                                "generation_failed")
    assert stream.result is None


def answering(server: FakeServer, status: int, body: bytes, headers: dict[str, str]) -> httpx.MockTransport:
    """The fake server, except that /v1/generate answers `status`, `body` and `headers`."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            return httpx.Response(status, content=body, headers=headers)
        return server.handle(request)
    return httpx.MockTransport(handle)


def events(*lines: str) -> bytes:
    """An event stream of `lines` (each "event: ...\\ndata: ..." or "data: ..."), ending with no final event."""
    return "".join(f"{line}\n\n" for line in lines).encode()


SSE = {"Content-Type": "text/event-stream"}
DONE = "event: done\ndata: " + GenerateResponse(text="par", prompt_tokens=6, completion_tokens=1).model_dump_json()


def test_the_generation_settings_are_sent_as_query_parameters(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        client.generate("paris")
        client.generate("paris", max_new_tokens=7, temperature=0.5, top_p=0.9, seed=0, stop=["x", "y"])
    defaults, given = server.generate_requests()
    assert defaults.method == given.method == "POST"
    assert dict(defaults.url.params) == {"max_new_tokens": "64", "temperature": "0.0", "top_p": "1.0",
                                         "stream": "false"}
    assert dict(given.url.params) | {"stop": given.url.params.get_list("stop")} == {
        "max_new_tokens": "7", "temperature": "0.5", "top_p": "0.9", "stream": "false", "seed": "0",
        "stop": ["x", "y"]}


def test_a_prompt_is_charged_to_its_budget_key_under_the_policys_limits(server, tmp_path, kind) -> None:
    # not the ledger's default delta, so that the policy's is seen to reach the ledger and the report
    policy = PrivacyPolicy(epsilon_per_token=1e9, epsilon_per_prompt=5e9, epsilon_total=7e9, delta=1e-7)
    with make_client(server, tmp_path, kind, budget_key="team", policy=policy) as client:
        result = client.generate("paris")
        client.generate("paris", budget_key="alice")
        spent = {key: client.ledger.spent(key).charges for key in ("default", "team", "alice")}
        limits = {key: client.ledger.limits(key) for key in ("team", "alice")}
    assert spent == {"default": 0, "team": 1, "alice": 1}
    assert limits == dict.fromkeys(("team", "alice"), Limits(per_prompt_epsilon=5e9, total_epsilon=7e9, delta=1e-7))
    params = wire.decode(server.generate_requests()[0].content).params
    assert result.privacy.delta == 1e-7
    assert result.privacy.epsilon == pytest.approx(privacy_report(params, 1, 1e-7).epsilon)


def test_a_prompt_exactly_at_the_per_prompt_cap_is_sent(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        cost = client.prepare("the capital of france is").report.epsilon
    policy = dataclasses.replace(POLICY, epsilon_per_prompt=cost)
    with make_client(server, tmp_path, kind, policy=policy) as client:
        client.generate("the capital of france is")
    assert len(server.generate_requests()) == 1


def test_stream_events_without_text_yield_nothing(server, tmp_path, kind) -> None:
    body = events("data: {}", 'data: {"text": ""}', 'data: {"text": "par"}', "event: ping\ndata: {}", DONE)
    with make_client(server, tmp_path, kind, transport=answering(server, 200, body, SSE)) as client:
        stream = client.generate("paris", stream=True)
        assert list(stream) == ["par"] and stream.result.text == "par"


@pytest.mark.parametrize("body", [events('data: {"text": "par"}'),  # no final event
                                  events("data: [1]", DONE), events("data: not json", DONE),
                                  events('data: {"text": 1}', DONE), events("event: done\ndata: {}")])
def test_a_stream_that_is_not_the_apis_raises_a_protocol_error(server, tmp_path, kind, body) -> None:
    with make_client(server, tmp_path, kind, transport=answering(server, 200, body, SSE)) as client:
        with pytest.raises(ProtocolError):
            list(client.generate("paris", stream=True))


def test_an_error_event_without_detail_reports_its_data(server, tmp_path, kind) -> None:
    body = events('event: error\ndata: {"error": 3}', DONE)
    with make_client(server, tmp_path, kind, transport=answering(server, 200, body, SSE)) as client:
        with pytest.raises(ServerError) as caught:
            list(client.generate("paris", stream=True))
    assert (caught.value.status_code, caught.value.detail, caught.value.kind) == (200, '{"error": 3}', None)


def test_an_answer_that_is_not_an_event_stream_or_a_generation_raises_a_protocol_error(server, tmp_path,
                                                                                        kind) -> None:
    transport = answering(server, 200, b'{"text": "par", "prompt_tokens": 6}', {"Content-Type": "application/json"})
    with make_client(server, tmp_path, kind, transport=transport) as client:
        with pytest.raises(ProtocolError, match="not an event stream"):
            list(client.generate("paris", stream=True))
        with pytest.raises(ProtocolError, match="not a valid generation"):
            client.generate("paris")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "body", "headers", "expected"), [
    (429, b'{"error": "rate_limited", "detail": "slow"}', {"Retry-After": "7"}, ("slow", "rate_limited", 7.0)),
    (503, b'{"error": "overloaded"}', {"Retry-After": "soon"}, ("overloaded", "overloaded", None)),
    (500, b'{"error": ["x"], "detail": "d"}', {}, ("d", None, None)),
    (500, b'{"detail": ""}', {}, ('{"detail": ""}', None, None)),
    (502, b"bad gateway", {}, ("bad gateway", None, None)), (400, b"[1]", {}, ("[1]", None, None))])
def test_an_error_status_raises_a_server_error_with_its_kind_and_retry_after(server, tmp_path, kind, stream, status,
                                                                            body, headers, expected) -> None:
    with make_client(server, tmp_path, kind, transport=answering(server, status, body, headers)) as client:
        with pytest.raises(ServerError) as caught:
            client.generate("paris", stream=stream)
        assert client.ledger.spent("default").charges == 1  # it reached the server: its charge stays
    error = caught.value
    assert (error.status_code, (error.detail, error.kind, error.retry_after)) == (status, expected)


def test_text_held_back_as_a_possible_placeholder_is_yielded_when_the_stream_ends(server, tmp_path, kind) -> None:
    server.chunks = ["hello PER"]  # may begin the bare form PERSON_1
    with make_client(server, tmp_path, kind) as client:
        stream = client.generate([{"role": "user", "content": [Part("paris", "placeholder", "PERSON")]}], stream=True)
        assert "".join(stream) == "hello PER"


def test_a_ledger_object_is_used_as_given(server, tmp_path, kind) -> None:
    ledger = BudgetLedger(tmp_path / "mine.db")
    with make_client(server, tmp_path, kind, ledger=ledger) as client:
        client.generate("paris")
        assert client.ledger is ledger
    assert ledger.spent("default").charges == 1
    assert ledger.limits("default") == Limits(POLICY.epsilon_per_prompt, POLICY.epsilon_total, POLICY.delta)


def test_the_default_cache_is_the_files_folder_of_the_sdks_cache(server, tmp_path, kind, monkeypatch) -> None:
    monkeypatch.setattr(client_module, "DEFAULT_CACHE_DIR", tmp_path / "veil")
    make_client(server, tmp_path, kind, cache_dir=None).bundle
    assert (tmp_path / "veil" / "files" / server.info.tokenizer_sha256).exists()


def test_a_server_speaking_an_older_wire_version_is_refused(server, tmp_path, kind) -> None:
    server.info.wire_version = wire.VERSION - 1
    with pytest.raises(BundleError, match="wire version"):
        make_client(server, tmp_path, kind).bundle


@pytest.mark.parametrize("path", ["/v1/bundle", "/v1/bundle/tokenizer.json"])
def test_a_bundle_request_the_server_refuses_raises_a_server_error(server, tmp_path, kind, path) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == path:
            return httpx.Response(503, json={"error": "overloaded", "detail": "busy"})
        return server.handle(request)

    with pytest.raises(ServerError) as caught:
        make_client(server, tmp_path, kind, transport=httpx.MockTransport(handle)).bundle
    assert (caught.value.status_code, caught.value.kind) == (503, "overloaded")


class RecordingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that records whether it was closed."""

    def __init__(self, body: bytes) -> None:
        self.body, self.closed = body, False

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("stream", "status"), [(False, 200), (False, 500), (True, 200), (True, 500)])
def test_every_answer_is_closed_once_read(server, tmp_path, kind, stream, status) -> None:
    bodies: list[RecordingStream] = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer = server.handle(request)
        if request.url.path != "/v1/generate":
            return answer
        bodies.append(RecordingStream(answer.read()))
        return httpx.Response(status, headers=answer.headers, stream=bodies[-1])

    with make_client(server, tmp_path, kind, transport=httpx.MockTransport(handle)) as client:
        try:
            answer = client.generate("paris", stream=stream)
        except ServerError:
            assert status == 500
        else:
            assert bodies[0].closed != stream  # a stream stays open until it has been read
            assert ("".join(answer) if stream else answer.text) == "paris"
    assert bodies[0].closed


def test_closing_a_client_closes_its_connections(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        client.bundle
    http = client._http if kind == "sync" else client.client._http
    assert http.is_closed


def test_charges_compose_as_one_prompt_of_all_their_private_tokens(server, tmp_path) -> None:
    """Each charge carries its mechanism (private tokens, trials per token, worst-case p), so the ledger composes
    two prompts exactly as one prompt of both prompts' private tokens."""
    with make_client(server, tmp_path) as client:
        client.generate("the capital of france is")
        client.generate("the capital of france")
        spent = client.ledger.spent("default")
    params = MechanismParams.from_mu(5.0, bits=4, dim=DIM, clip=CLIP)
    assert spent.epsilon == pytest.approx(privacy_report(params, 9, POLICY.delta).epsilon, rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_declaring_more_than_the_cap_is_refused_unread_and_closed(server, tmp_path, kind, stream) -> None:
    body = RecordingStream(b"{}")

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            return httpx.Response(200, headers={"Content-Length": str(MAX_ANSWER_BYTES + 1)}, stream=body)
        return server.handle(request)

    with make_client(server, tmp_path, kind, transport=httpx.MockTransport(handle)) as client:
        with pytest.raises(ProtocolError, match="over the limit"):
            client.generate("paris", stream=stream)
    assert body.closed


def test_the_given_timeout_reaches_every_request(server, tmp_path, kind) -> None:
    timeouts = []
    transport = httpx.MockTransport(
        lambda request: timeouts.append(request.extensions["timeout"]) or server.handle(request))
    with make_client(server, tmp_path, kind, transport=transport, timeout=7.5) as client:
        client.generate("the capital", max_new_tokens=2)
    assert timeouts and all(t == dict.fromkeys(("connect", "read", "write", "pool"), 7.5) for t in timeouts)


def test_an_explicit_projection_is_used_and_an_unknown_one_refused(server, tmp_path, kind) -> None:
    known = server.info.projections[0].id
    with make_client(server, tmp_path, kind, projection_id=known) as client:
        client.generate("the capital", max_new_tokens=2)
    assert wire.decode(server.generate_requests()[-1].content, vocab_size=len(WORDS)).projection_id == known
    with make_client(server, tmp_path, kind, projection_id="00" * 8) as client, pytest.raises(BundleError):
        client.generate("the capital", max_new_tokens=2)


def test_an_explicit_projection_other_than_the_default_is_the_one_used(server, tmp_path, kind) -> None:
    other = server.add_projection(dim=8, clip=0.1)
    with make_client(server, tmp_path, kind, projection_id=other, mu=5.0,
                     policy=PrivacyPolicy(epsilon_per_token=1e9)) as client:
        client.generate("the capital", max_new_tokens=2)
    payload = wire.decode(server.generate_requests()[-1].content, vocab_size=len(WORDS))
    assert (payload.projection_id, payload.params) == (other, MechanismParams.from_mu(5.0, bits=4, dim=8, clip=0.1))


def test_a_client_without_a_key_sends_no_authorization(server, tmp_path, kind) -> None:
    with make_client(server, tmp_path, kind) as client:
        client.generate("the capital", max_new_tokens=2)
    assert server.requests and all("authorization" not in r.headers for r in server.requests)


def test_a_chat_template_the_app_vetted_is_rendered(server, tmp_path, kind) -> None:
    server.info.chat_template = TEMPLATE.replace("<|im_end|> ", "<|im_end|>  ")  # not one the SDK ships
    with make_client(server, tmp_path, kind) as client, pytest.raises(BundleError, match="chat template"):
        client.generate("the capital of france is")
    with make_client(server, tmp_path, kind, chat_templates=[server.info.chat_template]) as client:
        client.generate("the capital of france is")
    payload = wire.decode(server.generate_requests()[-1].content, vocab_size=len(WORDS))
    assert [(s.private, s.length) for s in payload.spans] == [(False, 2), (True, 5), (False, 3)]


def test_bundle_metadata_over_its_size_cap_is_refused(server, tmp_path, kind, monkeypatch) -> None:
    monkeypatch.setattr(client_module, "MAX_BUNDLE_INFO_BYTES", 100)
    with pytest.raises(BundleError, match="^the bundle: the server's answer"):
        make_client(server, tmp_path, kind).bundle


def _prepare_in_child(client: PrivateLLMClient, out) -> None:
    out.send(client.prepare("the capital of france is").payload)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_a_forked_unseeded_client_never_repeats_the_parents_noise(server, tmp_path) -> None:
    # a generator made once and copied into a child by fork would give both the same draws: the difference of two
    # prompts' levels would then cancel the noise. An unseeded client draws a fresh OS seed for each prompt.
    with make_client(server, tmp_path) as client:
        client.bundle  # fetched before the fork
        receive, send = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_prepare_in_child, args=(client, send))
        child.start()
        mine = client.prepare("the capital of france is").payload
        theirs = receive.recv()
        child.join(timeout=60)
    assert child.exitcode == 0 and mine != theirs
