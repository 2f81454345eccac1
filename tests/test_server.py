"""The server on the tiny model: end to end over loopback, the privacy path, and errors as 4xx JSON."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.api import create_app
from app.engine.request import EngineRequest, GenerationParams
from app.reconstruction import pca_projection
from app.soft_prompts import save_soft_prompt, select_soft_prompt
from client_sdk import PrivateLLMClient, wire
from client_sdk.mechanism import MechanismParams
from tests.conftest import PERMISSIVE, LoopbackServer


def test_end_to_end_over_loopback(loopback, client_cache) -> None:
    with PrivateLLMClient(loopback.url, cache_dir=client_cache) as client:
        result = client.generate("the capital of france is", max_new_tokens=5)
        streamed = client.generate("the capital of france is", max_new_tokens=5, stream=True)
        text = "".join(streamed)
    assert result.completion_tokens >= 1 and result.prompt_tokens == 10
    assert set(result.timings) >= {"decode", "reconstruct", "generate"}
    # the template (<|im_start|> user ... <|im_end|> <|im_start|> assistant) is public, the message private
    assert (result.privacy.private_tokens, result.privacy.public_tokens) == (5, 5)
    assert result.privacy.epsilon > 0 and result.bytes_sent == wire.payload_size(5, 8, 4, public=5, spans=3)
    assert streamed.result is not None and streamed.result.text == text


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed(loopback, client_cache) -> None:
    with PrivateLLMClient(loopback.url, cache_dir=client_cache, seed=5) as client:
        prepared = client.prepare("hello world")
    http = httpx.Client(base_url=loopback.url)

    def ask(**params) -> str:
        response = http.post("/v1/generate", params=params, content=prepared.payload,
                             headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        return response.json()["text"]

    assert ask(max_new_tokens=8) == ask(max_new_tokens=8)
    greedy = ask(max_new_tokens=8)
    assert ask(max_new_tokens=8, temperature=1.0, seed=3) == ask(max_new_tokens=8, temperature=1.0, seed=3)
    # sampling samples: other seeds give other texts (the tiny model's next-token distribution is nearly flat),
    # and a nucleus of one token is greedy again
    assert len({ask(max_new_tokens=8, temperature=1.0, seed=seed) for seed in range(4)} - {greedy}) > 1
    assert ask(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_the_server_receives_exactly_the_codec_bytes(settings, runner, client_cache) -> None:
    received: list[bytes] = []
    app = create_app(settings, runner=runner)

    @app.middleware("http")
    async def record(request, call_next):
        if request.url.path == "/v1/generate":
            received.append(await request.body())
        return await call_next(request)

    with LoopbackServer(app) as server:
        client = PrivateLLMClient(server.url, cache_dir=client_cache)
        result = client.generate("the capital of france is", max_new_tokens=2)
    body = received[0]
    payload = wire.decode(body)
    assert len(body) == result.bytes_sent == wire.payload_size(payload.private_tokens, payload.params.dim,
                                                               payload.params.bits, public=payload.public_tokens,
                                                               spans=len(payload.spans))
    # what arrived for the private tokens is n bits per coordinate of k: fewer bytes than even one per coordinate
    # of the model's b-dimensional embedding, so nothing resembling an embedding (b floats per token) arrives
    private_bytes = len(body) - wire.payload_size(0, payload.params.dim, payload.params.bits,
                                                  public=payload.public_tokens, spans=len(payload.spans))
    assert 0 < private_bytes < payload.private_tokens * runner.model.config.hidden_size


def test_pca_projection_is_exact_at_full_width(runner) -> None:
    table = runner.input_embeddings.detach()
    full = pca_projection(table, table.shape[1], clip=1e6)
    assert torch.allclose(full.reconstruct(full.project(table)), table, atol=1e-4)
    z = pca_projection(table, 8, clip=2.0).project(table)
    assert torch.allclose(z.std(dim=0), torch.ones(8), atol=1e-3)  # whitened


def spy_on_submit(service, monkeypatch) -> list[EngineRequest]:
    """The requests `service` hands its backend from now on (the backend still runs them)."""
    submitted, submit = [], service.backend.submit
    monkeypatch.setattr(service.backend, "submit", lambda request: submitted.append(request) or submit(request))
    return submitted


def test_soft_prompt_is_prepended_and_selected_by_nearest_mu(settings, runner, client_cache, monkeypatch) -> None:
    with TestClient(create_app(settings, runner=runner)) as http:
        pid = http.get("/v1/bundle").json()["defaults"]["projection_id"]
    for name, mu in (("loose", 50.0), ("strict", 2.0)):
        save_soft_prompt(torch.randn(3, 32), settings.soft_prompt_dir / name,
                         {"model_id": "tiny-llama", "base_model_sha256": runner.fingerprint, "projection_id": pid,
                          "bits": 4, "mu": mu, "active": True},
                         runner)
    app = create_app(settings, runner=runner)
    with LoopbackServer(app) as server:
        submitted = spy_on_submit(app.state.service, monkeypatch)
        # soft prompts are prepended to prompts that are private throughout (chat=False: no public template)
        client = PrivateLLMClient(server.url, cache_dir=client_cache, mu=30.0, policy=PERMISSIVE)
        assert {s.name for s in client.bundle.info.soft_prompts} == {"loose", "strict"}
        answer = client.generate("hello", max_new_tokens=2, chat=False)
        assert (answer.soft_prompt, answer.soft_prompt_mu, answer.soft_prompt_exact) == ("loose", 50.0, False)
        strict = PrivateLLMClient(server.url, cache_dir=client_cache, mu=2.0)
        assert strict.generate("hello", max_new_tokens=2, chat=False).soft_prompt_exact
        templated = strict.generate("hello", max_new_tokens=2)  # a public chat template: no soft prompt
        assert (templated.soft_prompt, templated.soft_prompt_exact) == (None, False)
        service = app.state.service
        prepared = service.prepare(client.prepare("hello", chat=False).payload)
    # the backend puts the soft prompt before the prompt (its keys and values are cached): tests/test_backends.py
    assert prepared.embeddings.shape[0] == prepared.prompt_tokens and prepared.soft_prompt.embeddings.shape[0] == 3
    prompts = service.catalog.soft_prompts
    assert [r.prefix.name if r.prefix else None for r in submitted] == ["loose", "strict", None]
    assert submitted[0].prefix.embeddings is next(s for s in prompts if s.name == "loose").embeddings
    assert select_soft_prompt(prompts, pid, 4, 3.0)[0].name == "strict"
    assert select_soft_prompt(prompts, pid, 2, 3.0) == (None, False)


def test_a_prompt_below_the_floor_is_served_only_when_the_operator_opts_in(settings, runner) -> None:
    with TestClient(create_app(settings, runner=runner)) as http:
        pid = http.get("/v1/bundle").json()["defaults"]["projection_id"]
    save_soft_prompt(torch.randn(3, 32), settings.soft_prompt_dir / "worse",
                     {"model_id": "tiny-llama", "base_model_sha256": runner.fingerprint, "projection_id": pid, "bits": 4,
                      "mu": 4.0, "active": True, "floor_check": {"passes": False, "reason": "worse than sending nothing"}}, runner)
    for opt_in, expected in ((False, []), (True, ["worse"])):
        with TestClient(create_app(settings.model_copy(update={"serve_below_floor": opt_in}), runner=runner)) as http:
            assert [p["name"] for p in http.get("/v1/bundle").json()["soft_prompts"]] == expected


@pytest.fixture
def http(settings, runner):
    with TestClient(create_app(settings, runner=runner)) as client:
        yield client


def good_payload(http, *, tokens: int = 3, dim: int = 8, projection_id: str | None = None) -> bytes:
    """A well-formed private payload (mu 10, n=4) for the served default projection (k=8), or as asked."""
    info = http.get("/v1/bundle").json()
    params = MechanismParams.from_mu(10.0, bits=4, dim=dim, clip=2.0)
    levels = np.zeros((tokens, dim), dtype=np.uint8)
    return wire.encode(wire.Payload(params, projection_id or info["defaults"]["projection_id"], levels))


@pytest.mark.parametrize(
    ("mutate", "params", "status", "kind"),
    [
        (lambda b: b"garbage", {}, 400, "bad_payload"),
        (lambda b: b[:-1], {}, 400, "bad_payload"),
        (lambda b: b + b"\0", {}, 400, "bad_payload"),
        (lambda b: b[:22] + b"\xff" * 8 + b[30:], {}, 400, "bad_payload"),
        (lambda b: b"", {}, 400, "bad_payload"),
        (lambda b: b, {"max_new_tokens": 0}, 422, "invalid_parameter"),
        (lambda b: b, {"max_new_tokens": 10_000}, 422, "invalid_parameter"),
        (lambda b: b, {"temperature": -1}, 422, "invalid_parameter"),
        (lambda b: b, {"top_p": 0}, 422, "invalid_parameter"),
        (lambda b: b, {"seed": "x"}, 422, "invalid_parameter"),
        (lambda b: b, {"stop": ""}, 422, "invalid_parameter"),
        (lambda b: b * 1000, {}, 413, "payload_too_large"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(http, mutate, params, status, kind) -> None:
    response = http.post("/v1/generate", params=params, content=mutate(good_payload(http)),
                         headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and response.json()["detail"]


@pytest.mark.parametrize(("tokens", "dim", "projection_id"), [
    (65, 8, None),  # over max_prompt_tokens (64), yet under the byte limit (sized for the widest payload)
    (3, 16, None),  # not the projection's k
    (3, 8, "00" * 8),  # a projection this server does not serve
])
def test_payloads_are_checked_against_what_this_server_serves(http, tokens, dim, projection_id) -> None:
    body = good_payload(http, tokens=tokens, dim=dim, projection_id=projection_id)
    response = http.post("/v1/generate", content=body, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and response.json()["error"] == "bad_payload", response.text


def test_a_public_id_outside_the_vocabulary_is_a_bad_payload(http) -> None:
    vocab = http.app.state.service.runner.input_embeddings.shape[0]
    params = MechanismParams.from_mu(10.0, bits=4, dim=8, clip=2.0)
    body = wire.encode(wire.Payload(params, http.get("/v1/bundle").json()["defaults"]["projection_id"],
                                    np.zeros((1, 8), dtype=np.uint8), public_ids=np.array([vocab]),
                                    spans=(wire.Span(False, 1), wire.Span(True, 1))))
    response = http.post("/v1/generate", content=body, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and response.json()["error"] == "bad_payload", response.text


def test_wrong_content_type_and_unknown_routes(http) -> None:
    response = http.post("/v1/generate", content=good_payload(http), headers={"Content-Type": "application/json"})
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
    missing = http.get("/v1/bundle/projections/0000000000000000")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_openapi_documents_the_binary_body(settings, runner) -> None:
    with TestClient(create_app(settings.model_copy(update={"docs": True}), runner=runner)) as http:
        spec = http.get("/openapi.json").json()
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert body["application/octet-stream"]["schema"]["format"] == "binary"


def test_the_blocking_generate_answers_as_the_route_does(http, settings, monkeypatch) -> None:
    """InferenceService.generate (bench/server.py's) against POST /v1/generate on the same payload (greedy)."""
    service, body = http.app.state.service, good_payload(http)
    routed = http.post("/v1/generate", params={"max_new_tokens": 3}, content=body,
                       headers={"Content-Type": "application/octet-stream"}).json()
    submitted = spy_on_submit(service, monkeypatch)
    start, before = time.perf_counter(), time.monotonic()
    answer = service.generate(service.prepare(body), GenerationParams(max_new_tokens=3))
    elapsed, after = time.perf_counter() - start, time.monotonic()
    assert answer.model_dump(exclude={"timings"}) == {k: v for k, v in routed.items() if k != "timings"}
    assert set(answer.timings) == {"decode", "reconstruct", "generate"}
    assert all(0 < seconds < elapsed for seconds in answer.timings.values())
    deadline = submitted[0].deadline - settings.generation_deadline_s
    assert before <= deadline <= after


def test_stop_strings_cut_the_answer(runner) -> None:
    from app.engine.text import truncate_at_stop

    assert truncate_at_stop("paris is a city", ("a c", "zzz")) == "paris is "
    assert truncate_at_stop("paris", ()) == "paris"


def test_readiness_metrics_and_an_access_log_without_bodies(http, caplog) -> None:
    assert http.get("/readyz").json() == {"status": "ready", "model": "tiny-llama", "backend": "transformers"}
    payload = good_payload(http)
    with caplog.at_level("INFO", logger="veil.access"):
        answer = http.post("/v1/generate", params={"max_new_tokens": 3}, content=payload,
                           headers={"Content-Type": "application/octet-stream"}).json()
        http.post("/v1/generate", content=b"garbage", headers={"Content-Type": "application/octet-stream"})
    text = http.get("/metrics").text
    assert 'veil_http_requests_total{route="/v1/generate",status="200"} 1.0' in text
    assert 'veil_http_requests_total{route="/v1/generate",status="400"} 1.0' in text
    assert f"veil_payload_bytes_total {float(len(payload))}" in text
    assert "veil_prompt_tokens_total 3.0" in text
    assert f"veil_completion_tokens_total {float(answer['completion_tokens'])}" in text
    assert 'veil_private_requests_total{bits="4",dim="8",mu="10"} 1.0' in text
    assert 'veil_http_request_seconds_count{route="/v1/generate"} 2.0' in text
    lines = [record.getMessage() for record in caplog.records if record.name == "veil.access"]
    assert len(lines) == 2 and all('"route": "/v1/generate"' in line for line in lines)
    assert answer["text"].strip(), answer  # a text to look for in the log
    assert not any(answer["text"] in line or "garbage" in line for line in lines)


def test_readyz_is_503_until_the_model_is_up(settings, runner) -> None:
    app = create_app(settings, runner=runner)
    response = TestClient(app).get("/readyz")  # no lifespan: nothing loaded
    assert response.status_code == 503 and response.json()["error"] == "not_ready"


def test_a_client_that_disconnects_mid_stream_frees_the_model(settings, client_cache) -> None:
    from tests.conftest import tiny_runner

    runner = tiny_runner()
    runner.model.generation_config.eos_token_id = None  # only max_new_tokens, or a cancel, ends a generation
    forward, steps = runner.model.forward, []

    def slow_forward(*args, **kwargs):
        steps.append(1)
        time.sleep(0.01)
        return forward(*args, **kwargs)

    runner.model.forward = slow_forward
    settings.max_new_tokens = 400
    with LoopbackServer(create_app(settings, runner=runner)) as server:
        with PrivateLLMClient(server.url, cache_dir=client_cache) as client:
            body = client.prepare("hello world").payload
        with httpx.Client(base_url=server.url) as http:
            with http.stream("POST", "/v1/generate", params={"max_new_tokens": 400, "stream": "true"}, content=body,
                             headers={"content-type": "application/octet-stream"}) as response:
                next(line for line in response.iter_lines() if line.startswith("data"))
        deadline = time.monotonic() + 3  # the whole generation (400 steps of at least 10 ms) takes 4 s or more
        while True:  # steps must stop: wait for 0.3 s (about 30 steps' time) without one
            before = len(steps)
            time.sleep(0.3)
            if len(steps) == before:
                break
            assert time.monotonic() < deadline, f"still generating after its client left ({len(steps)} steps)"
        assert len(steps) < 400
        assert runner.lock.acquire(timeout=2)  # the slot is free for the next request
        runner.lock.release()
