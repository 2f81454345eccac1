"""One client must not stall the others (issue 15), on the tiny model slowed to 10 ms a step over loopback: every
generation stops within a token of its client going away, a full queue answers 503 with Retry-After and recovers
at once, a generation past the deadline is stopped, stop strings are bounded, stream errors tell clients nothing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import AsyncIterator

import httpx
import pytest

from app.api import create_app
from app.engine.request import EngineRequest, GenerationParams
from app.engine.transformers import decode
from app.routes.generate import CancellingEventSource
from client_sdk import PrivateLLMClient
from tests.conftest import LoopbackServer, tiny_runner

OCTET = {"content-type": "application/octet-stream"}


def slow_runner(batch_sizes: list[int], delay: float = 0.01):
    """The tiny model, `delay` seconds a forward pass, recording each pass's batch size; no end-of-sequence."""
    runner = tiny_runner()
    runner.model.generation_config.eos_token_id = None  # only max_new_tokens, a cancel or a deadline ends it
    forward = runner.model.forward

    def slow_forward(*args, **kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        batch_sizes.append(int(inputs.shape[0]))
        time.sleep(delay)
        return forward(*args, **kwargs)

    runner.model.forward = slow_forward
    return runner


def serve(settings, runner) -> LoopbackServer:
    return LoopbackServer(create_app(settings, runner=runner))


def payload(server: LoopbackServer, client_cache) -> bytes:
    with PrivateLLMClient(server.url, cache_dir=client_cache) as client:
        return client.prepare("hello world").payload


def assert_stopped(steps: list[int]) -> int:
    """The model takes no more steps (the generation stopped); returns how many it took."""
    time.sleep(0.3)
    taken = len(steps)
    time.sleep(0.5)  # 50 steps' time
    assert len(steps) == taken, "the model is still generating"
    return taken


def in_threads(target, count: int) -> None:
    """Run `target` in `count` threads at once and wait for all of them."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.fixture
def long_settings(settings):
    settings.max_new_tokens = 400
    return settings


def test_a_plain_request_whose_client_goes_away_stops_generating(long_settings, client_cache) -> None:
    steps: list[int] = []
    server = serve(long_settings, slow_runner(steps))
    with server:
        body = payload(server, client_cache)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server.url}/v1/generate", params={"max_new_tokens": 400}, content=body, headers=OCTET,
                       timeout=httpx.Timeout(5, read=0.5))
        assert assert_stopped(steps) < 150  # 400 steps would take 4 s at least
        response = httpx.post(f"{server.url}/v1/generate", params={"max_new_tokens": 3}, content=body,
                              headers=OCTET, timeout=10)
        assert response.status_code == 200


def test_batched_streams_whose_clients_go_away_all_stop(long_settings, client_cache) -> None:
    steps: list[int] = []
    server = serve(long_settings, slow_runner(steps))
    first_events = []

    def read_one_event() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/generate", params={"max_new_tokens": 400, "stream": "true"},
                             content=body, headers=OCTET) as response:
                first_events.append(next(line for line in response.iter_lines() if line.startswith("data")))

    with server:
        body = payload(server, client_cache)
        in_threads(read_one_event, 4)
        assert len(first_events) == 4 and max(steps) > 1  # they did share a batch
        assert assert_stopped(steps) < 150


def test_a_stream_whose_client_leaves_before_its_first_event_is_cancelled() -> None:
    """The event generator never runs (so its own cleanup never does): the response itself sets the cancel."""
    cancelled = threading.Event()

    async def no_events() -> AsyncIterator[dict]:
        await asyncio.Event().wait()  # nothing to say yet
        yield {}

    async def client_gone() -> dict:
        return {"type": "http.disconnect"}

    async def discard(message: dict) -> None:
        pass

    response = CancellingEventSource(no_events(), cancelled)
    asyncio.run(asyncio.wait_for(response({"type": "http", "method": "POST", "headers": []}, client_gone, discard), 5))
    assert cancelled.is_set()


def test_a_cancelled_row_leaves_its_batch_at_once() -> None:
    sizes: list[int] = []
    runner = slow_runner(sizes, delay=0)
    embeds = [runner.input_embeddings[[5, 6, 7]].detach(), runner.input_embeddings[[8, 9]].detach()]
    gone = EngineRequest(None, embeds[0], GenerationParams(max_new_tokens=20))
    gone.on_text = lambda piece: gone.cancelled.set()  # its client leaves after the first piece
    stays = EngineRequest(None, embeds[1], GenerationParams(max_new_tokens=20))
    answers = decode(runner, [gone, stays])
    assert answers[0].finish_reason == "cancelled" and answers[1].new_tokens == 20
    assert sizes == [2, 2] + [1] * 18  # from the token after the cancel, one row only
    assert answers[1] == decode(runner, [EngineRequest(None, embeds[1], GenerationParams(max_new_tokens=20))])[0]


def test_a_full_queue_answers_503_with_retry_after_and_recovers_at_once(settings, client_cache) -> None:
    settings.max_batch_size, settings.max_queue = 1, 2
    server = serve(settings, slow_runner([]))
    responses: list[httpx.Response] = []

    def ask() -> None:
        responses.append(httpx.post(f"{server.url}/v1/generate", params={"max_new_tokens": 20}, content=body,
                                    headers=OCTET, timeout=30))

    with server:
        body = payload(server, client_cache)
        in_threads(ask, 8)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.json()["error"] == "overloaded" and int(refused.headers["retry-after"]) >= 1
        again = httpx.post(f"{server.url}/v1/generate", params={"max_new_tokens": 2}, content=body, headers=OCTET)
        assert again.status_code == 200


def test_a_generation_past_the_deadline_is_stopped_with_503(long_settings, client_cache) -> None:
    long_settings.generation_deadline_s = 0.5
    steps: list[int] = []
    server = serve(long_settings, slow_runner(steps))
    with server:
        body = payload(server, client_cache)
        response = httpx.post(f"{server.url}/v1/generate", params={"max_new_tokens": 400}, content=body,
                              headers=OCTET, timeout=30)
        assert response.status_code == 503 and response.json()["error"] == "deadline_exceeded"
        assert assert_stopped(steps) < 150
        with httpx.stream("POST", f"{server.url}/v1/generate", params={"max_new_tokens": 400, "stream": "true"},
                          content=body, headers=OCTET, timeout=30) as streamed:
            lines = list(streamed.iter_lines())
        assert "event: error" in lines
        assert json.loads(lines[lines.index("event: error") + 1][len("data: "):])["error"] == "deadline_exceeded"


def test_a_failed_stream_tells_the_client_nothing_of_the_cause_and_logs_it(settings, client_cache, caplog) -> None:
    runner = tiny_runner()

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/model")

    runner.model.forward = broken
    server = serve(settings, runner)
    with server, caplog.at_level("ERROR", logger="veil.generate"):
        body = payload(server, client_cache)
        with httpx.stream("POST", f"{server.url}/v1/generate", params={"stream": "true"}, content=body,
                          headers=OCTET, timeout=30) as streamed:
            text = "\n".join(streamed.iter_lines())
    assert "event: error" in text and "generation_failed" in text and "secret" not in text
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


def test_media_types_are_case_insensitive_and_stop_strings_bounded(settings, runner, client_cache) -> None:
    server = serve(settings, runner)
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        body = payload(server, client_cache)
        ok = http.post("/v1/generate", params={"max_new_tokens": 2}, content=body,
                       headers={"content-type": "APPLICATION/OCTET-STREAM"})
        assert ok.status_code == 200, ok.text
        for stop in ("x" * 1000, " ".join(["paris"] * 40)):
            refused = http.post("/v1/generate", params={"max_new_tokens": 2, "stop": stop}, content=body,
                                headers=OCTET)
            assert refused.status_code == 422 and refused.json()["error"] == "invalid_parameter"
