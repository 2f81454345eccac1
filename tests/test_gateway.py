"""The gateway with the official `openai` client, in front of the tiny-model veil server (both real uvicorn servers on
loopback): the same answers as the SDK, OpenAI's formats, errors, budgets per caller and the local page."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from typer.testing import CliRunner

from app.api import create_app
from client_sdk import AsyncPrivateLLMClient, BudgetLedger, PrivacyPolicy, PrivateLLMClient, wire
from client_sdk.gateway import GatewayConfig, create_gateway
from client_sdk.gateway.modes import Conversations, to_messages
from client_sdk.gateway.stop import StopScanner
from tests.conftest import WORDS, LoopbackServer

MESSAGES = [{"role": "system", "content": "a city and a river"},
            {"role": "user", "content": "what is the capital of france ?"}]


@contextmanager
def gateway(server_url: str, tmp_path: Path, config: GatewayConfig = GatewayConfig(), **client_options) -> Iterator:
    """A gateway on loopback in front of `server_url`, and an `openai.OpenAI` client of it (no retries)."""
    options = {"cache_dir": tmp_path / "client-cache", "ledger": tmp_path / "gateway-ledger.db", **client_options}
    client = AsyncPrivateLLMClient(server_url, **options)
    with LoopbackServer(create_gateway(client, config)) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as oa:
            yield server, oa, client


@pytest.fixture
def recorded(settings, runner) -> Iterator[tuple[LoopbackServer, list[httpx.URL], list[bytes]]]:
    """The tiny-model server, recording each /v1/generate request's URL and body."""
    urls, bodies = [], []
    app = create_app(settings, runner=runner)

    @app.middleware("http")
    async def record(request, call_next):
        if request.url.path == "/v1/generate":
            urls.append(request.url)
            bodies.append(await request.body())
        return await call_next(request)

    with LoopbackServer(app) as server:
        yield server, urls, bodies


def test_the_openai_client_gets_the_sdks_answers_streaming_and_not(loopback, tmp_path) -> None:
    settings = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=3)
    with PrivateLLMClient(loopback.url, cache_dir=tmp_path / "c", ledger=tmp_path / "sdk.db", seed=7) as sdk:
        single = sdk.generate(MESSAGES, **settings)
        stream = sdk.generate(MESSAGES, stream=True, **settings)
        streamed = list(stream)
    with gateway(loopback.url, tmp_path, seed=7) as (_, oa, _client):
        ask = dict(model="anything", messages=MESSAGES, max_tokens=8, temperature=0.9, top_p=0.95, seed=3)
        raw = oa.chat.completions.with_raw_response.create(**ask)
        completion = raw.parse()
        chunks = list(oa.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert completion.object == "chat.completion" and completion.model == "tiny-llama"
    assert completion.choices[0].message.content == single.text and single.text.strip()
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (single.prompt_tokens,
                                                                                    single.completion_tokens)
    assert completion.choices[0].finish_reason == ("length" if single.completion_tokens == 8 else "stop")
    # the privacy spent, in the body (a field clients ignore) and the headers
    assert completion.veil["epsilon"] == pytest.approx(single.privacy.epsilon) and single.privacy.epsilon > 0
    assert completion.veil["private_tokens"] == single.privacy.private_tokens == 12  # both messages, noised
    assert float(raw.headers["x-veil-epsilon"]) == pytest.approx(single.privacy.epsilon)
    assert raw.headers["x-veil-private-tokens"] == "12" and raw.headers["x-veil-budget-key"] == "gateway"
    # streamed: role first, the text in deltas, a finish reason, then the usage chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(streamed) == stream.result.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stream.result.completion_tokens
    assert chunks[-1].veil["epsilon"] == pytest.approx(stream.privacy.epsilon)


def test_a_stream_is_server_sent_events_ending_in_done(loopback, tmp_path) -> None:
    with gateway(loopback.url, tmp_path) as (server, _, _client):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                          json={"messages": MESSAGES, "max_tokens": 4, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert float(response.headers["x-veil-epsilon"]) > 0
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "veil" in chunks[-1]
    assert not any("usage" in c for c in chunks)  # not asked for


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hello", "name": "ann"}]}, "messages[0].name"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_unsupported_or_bad_fields_are_refused_by_name(loopback, tmp_path, extra, param) -> None:
    with gateway(loopback.url, tmp_path) as (_, oa, _client):
        err = error_of(lambda: oa.chat.completions.create(**{"model": "m", "messages": MESSAGES, **extra}))
    assert err.status_code == 400 and err.body["param"] == param and param.split("[")[0] in err.message
    assert err.body["type"] == "invalid_request_error"


def test_no_op_values_of_unsupported_fields_are_accepted(loopback, tmp_path) -> None:
    with gateway(loopback.url, tmp_path) as (_, oa, _client):
        completion = oa.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, n=1, logprobs=False,
                                                presence_penalty=0, response_format={"type": "text"})
    assert completion.choices[0].message.content is not None


def test_the_budget_refusal_policy_refusal_and_the_callers_budget_key(loopback, tmp_path) -> None:
    tight = PrivacyPolicy(epsilon_per_token=PrivacyPolicy.default().epsilon_per_token, epsilon_per_prompt=1e-3)
    with gateway(loopback.url, tmp_path, policy=tight) as (_, oa, client):
        err = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES, user="ann"))
        assert (err.status_code, err.code, err.type) == (429, "budget_exceeded", "insufficient_quota")
        assert err.response.headers["x-should-retry"] == "false" and "nothing was sent" in err.message
        assert client.ledger.spent("user:ann").charges == 0
    with gateway(loopback.url, tmp_path) as (_, oa, client):
        answer = oa.chat.completions.create(model="m", messages=MESSAGES, user="ann", max_tokens=2)
        assert answer.veil["budget_key"] == "user:ann" and client.ledger.spent("user:ann").charges == 1
        assert client.ledger.spent("gateway").charges == 0
        raw = oa.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, user="zoë 用户", max_tokens=2)
        assert raw.parse().veil["budget_key"] == "user:zoë 用户"
        assert raw.headers["x-veil-budget-key"] == "user:zo%C3%AB %E7%94%A8%E6%88%B7"
    strict = PrivacyPolicy(epsilon_per_token=0.5)  # the server suggests mu = 4: looser than that
    with gateway(loopback.url, tmp_path, policy=strict) as (_, oa, _client):
        err = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES))
    assert (err.status_code, err.code) == (403, "policy_refusal")


def test_an_unreachable_or_overloaded_server_has_its_own_error(settings, runner, tmp_path) -> None:
    with LoopbackServer(create_app(settings, runner=runner)) as stopped:
        url = stopped.url
    with gateway(url, tmp_path) as (_, oa, _client):
        err = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES))
    assert (err.status_code, err.code, err.type) == (502, "server_unreachable", "api_error")

    app = create_app(settings, runner=runner)

    @app.middleware("http")
    async def full(request, call_next):
        if request.url.path == "/v1/generate":
            return json_response(503, {"error": "overloaded", "detail": "the queue is full"}, {"Retry-After": "7"})
        return await call_next(request)

    with LoopbackServer(app) as busy, gateway(busy.url, tmp_path) as (_, oa, _client):
        err = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES))
        streamed = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    for e in (err, streamed):
        assert (e.status_code, e.code) == (503, "server_overloaded") and e.response.headers["retry-after"] == "7"
        assert "the queue is full" in e.message


def json_response(status: int, body: dict, headers: dict):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def test_gateway_keys_are_required_and_pick_the_budget(loopback, tmp_path) -> None:
    config = GatewayConfig(keys={"s" * 20: "team-a"})
    with gateway(loopback.url, tmp_path, config) as (server, oa, client):
        err = error_of(lambda: oa.chat.completions.create(model="m", messages=MESSAGES))
        assert (err.status_code, err.code) == (401, "invalid_api_key")
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s" * 20, max_retries=0)
        answer = keyed.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, user="someone")
        assert [m.id for m in keyed.models.list()] == ["tiny-llama"]
    assert answer.veil["budget_key"] == "team-a" and client.ledger.spent("team-a").charges == 1


def test_stop_strings_are_applied_on_the_device_and_never_sent(recorded, tmp_path) -> None:
    server, urls, _ = recorded
    ask = dict(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
    with gateway(server.url, tmp_path, seed=7) as (_, oa, _client):
        full = oa.chat.completions.create(**ask).choices[0].message.content
    stop = full.split()[1]
    for stream in (False, True):
        with gateway(server.url, tmp_path, seed=7) as (_, oa, _client):
            if stream:
                chunks = list(oa.chat.completions.create(**ask, stop=[stop], stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            else:
                choice = oa.chat.completions.create(**ask, stop=stop).choices[0]
                text, finish = choice.message.content, choice.finish_reason
        assert text == full[: full.index(stop)] and finish == "stop"
    assert len(urls) == 3 and not any("stop" in url.query for url in urls)


def test_stop_scanner_holds_back_only_a_possible_stop() -> None:
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.feed("hello E") == "hello " and scanner.feed("N") == "" and scanner.feed("x") == "ENx"
    assert scanner.feed(" tail\n") == " tail" and scanner.feed("\nmore") == "" and scanner.stopped
    assert StopScanner(["xy"]).flush() == ""


def test_markup_keeps_private_text_off_the_wire_in_every_message(recorded, tmp_path) -> None:
    server, _, bodies = recorded
    conversation = [{"role": "user", "content": "what is the capital of [[france|COUNTRY]] ?"},
                    {"role": "assistant", "content": "the capital of france is paris"},  # as the user saw it
                    {"role": "user", "content": "[[paris]] is a city ?"},
                    {"role": "user", "content": [{"type": "text", "text": "hello paris"}]}]
    with gateway(server.url, tmp_path, GatewayConfig(mode="markup")) as (_, oa, _client):
        answer = oa.chat.completions.create(model="m", messages=conversation, max_tokens=2)
    payload = wire.decode(bodies[0])
    public = set(payload.public_ids.tolist())
    assert WORDS.index("france") not in public and WORDS.index("paris") not in public
    assert WORDS.index("capital") in public  # unmarked text is public in markup mode
    # "paris" is noised in both later messages (3 tokens), "france" is a placeholder: never sent in any form
    assert payload.private_tokens == answer.veil["private_tokens"] == 3 and answer.veil["placeholders"] == 1


def test_the_modes_and_the_conversation_map() -> None:
    pairs = [("user", ["mail [[ann@x.org|EMAIL]] now"]), ("assistant", ["sent to ann@x.org."]),
             ("developer", ["be brief"])]
    messages = to_messages(pairs, "markup")
    conversations = Conversations()
    parts = conversations.get("k", pairs).parts(messages)
    assert [p.treatment for p in parts[1]] == ["public", "placeholder", "public"]  # the restored answer too
    assert messages[2].role == "system" and parts[2][0].treatment == "public"
    assert conversations.get("k", pairs[:1] + [("user", ["later"])]) is conversations.get("k", pairs)
    assert conversations.get("other key", pairs) is not conversations.get("k", pairs)
    detected = to_messages([("user", ["call +44 20 7946 0958 today"])], "detect")
    assert [p.treatment for p in detected[0].parts()] == ["public", "placeholder", "public"]
    assert to_messages([("user", ["all ", "of it"])], "whole")[0].content == "all of it"  # private throughout


def test_a_conversation_remembers_its_values_across_requests(recorded, tmp_path) -> None:
    server, _, bodies = recorded
    opening = [{"role": "user", "content": "hello"}]
    with gateway(server.url, tmp_path, GatewayConfig(mode="markup")) as (_, oa, _client):
        oa.chat.completions.create(model="m", messages=opening + [
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "[[paris|CITY]] is a city ?"}],
            max_tokens=2)
        # the client regenerates from an edited history: the value is no longer marked, the conversation knows it
        later = oa.chat.completions.create(model="m", messages=opening + [
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "paris is the capital ?"}],
            max_tokens=2)
        other = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "paris is the capital ?"}],
                                           max_tokens=2)
    assert WORDS.index("paris") not in wire.decode(bodies[1]).public_ids.tolist() and later.veil["placeholders"] == 1
    assert WORDS.index("paris") in wire.decode(bodies[2]).public_ids.tolist() and other.veil["placeholders"] == 0


def restoring_server():
    """The SDK tests' fake server, answering with a placeholder split across chunks."""
    from tests.test_client import POLICY, FakeServer

    fake = FakeServer()
    fake.chunks = ["the [CI", "TY_1", "] is"]
    return fake, POLICY


def test_placeholders_are_restored_across_chunks_as_they_stream(tmp_path) -> None:
    fake, policy = restoring_server()
    client = AsyncPrivateLLMClient("http://fake", cache_dir=tmp_path / "c", ledger=False, policy=policy,
                                   transport=httpx.MockTransport(fake.handle))
    app = create_gateway(client, GatewayConfig(mode="markup"))
    messages = [{"role": "user", "content": "the capital of [[paris|CITY]]"}]

    async def ask() -> tuple:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            oa = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="unused", http_client=http, max_retries=0)
            single = await oa.chat.completions.create(model="m", messages=messages)
            stream = await oa.chat.completions.create(model="m", messages=messages, stream=True)
            return single, [c.choices[0].delta.content async for c in stream if c.choices]

    single, deltas = asyncio.run(ask())
    assert single.choices[0].message.content == "the paris is"
    assert "".join(d or "" for d in deltas) == "the paris is" and "the " in deltas  # not held to the end
    assert not any("CI" in (d or "") for d in deltas)
    assert b"paris" not in fake.requests[-1].content


def test_the_page_shows_the_last_requests_spans_and_budgets(recorded, tmp_path) -> None:
    server, _, _ = recorded
    with gateway(server.url, tmp_path, GatewayConfig(mode="markup")) as (gw, oa, _client):
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content":
                                                          "the capital of [[france|COUNTRY]] is [[paris]]"}],
                                   max_tokens=2, user="ann")
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=2,
                                   user="bob")  # nothing private: nothing spent, but the key has its cap
        page = httpx.get(f"{gw.url}/").text
        from fastapi.testclient import TestClient  # its client is not on loopback

        remote = TestClient(create_gateway(_client, GatewayConfig())).get("/")
    assert remote.status_code == 403 and remote.json()["error"]["code"] == "page_loopback_only"
    assert '<span class="placeholder" title="replaced by [COUNTRY_1]">france</span>' in page
    assert '<span class="noise">paris</span>' in page and '<span class="public">the capital of </span>' in page
    assert "user:ann" in page and 'id="budgets"' in page
    ledger = BudgetLedger(tmp_path / "gateway-ledger.db")
    spent, cap = ledger.spent("user:ann").epsilon, ledger.limits("user:bob").total_epsilon
    assert f"{spent:.4g}" in page and spent > 0
    assert cap == PrivacyPolicy.default().epsilon_total and page.count(f"{cap:.4g}") >= 3  # caps and bob's left


def test_the_page_renders_in_a_real_browser(recorded, tmp_path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    server, _, _ = recorded
    with gateway(server.url, tmp_path, GatewayConfig(mode="markup")) as (gw, oa, _client):
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello [[paris|CITY]]"}],
                                   max_tokens=2)
        shot = tmp_path / "page.png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tempfile.mkdtemp()}"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", f"{gw.url}/"], capture_output=True, text=True,
                             timeout=120).stdout
        subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1100,700", f"{gw.url}/"],
                       capture_output=True, timeout=120)
    assert 'title="replaced by [CITY_1]">paris</span>' in dom and "gateway" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_refuses_to_listen_beyond_loopback_without_keys(tmp_path) -> None:
    from client_sdk.cli import cli

    result = CliRunner().invoke(cli, ["gateway", "--server", "http://127.0.0.1:1", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "serves this machine only" in result.output
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"a": "short"}))
    result = CliRunner().invoke(cli, ["gateway", "--server", "http://x", "--keys-file", str(keys)])
    assert result.exit_code != 0 and "16+ characters" in result.output


def test_requests_that_are_not_json_or_unknown_routes_get_openai_errors(loopback, tmp_path) -> None:
    with gateway(loopback.url, tmp_path) as (server, _, _client):
        bad = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope")
        missing = httpx.get(f"{server.url}/v1/nothing")
        empty = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    assert all(r.json()["error"].keys() == {"message", "type", "param", "code"} for r in (bad, missing, empty))


def test_the_readmes_openai_recipe_runs(loopback, tmp_path, capsys) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## OpenAI clients") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    with gateway(loopback.url, tmp_path) as (server, _, _client):
        exec(compile(code.replace("http://127.0.0.1:8787", server.url), "README.md", "exec"), {})
    assert "epsilon spent:" in capsys.readouterr().out


def test_a_slow_ledger_write_does_not_stall_other_callers(loopback, tmp_path) -> None:
    import threading
    import time

    with gateway(loopback.url, tmp_path) as (server, oa, client):
        oa.models.list()  # the bundle is fetched
        reserve = client.ledger.reserve

        def slow_reserve(*args, **kwargs) -> None:
            time.sleep(1.5)  # a durable write on a slow disk
            reserve(*args, **kwargs)

        client.ledger.reserve = slow_reserve
        asking = threading.Thread(target=lambda: oa.chat.completions.create(model="m", messages=MESSAGES,
                                                                            max_tokens=2))
        asking.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
        waited = time.monotonic() - start
        asking.join(timeout=30)
    assert waited < 0.8


def test_legacy_completions_continue_a_prompt_as_the_sdk_does(loopback, tmp_path) -> None:
    settings = dict(max_new_tokens=6, temperature=0.0, seed=1)
    with PrivateLLMClient(loopback.url, cache_dir=tmp_path / "c", ledger=False, seed=3) as sdk:
        single = sdk.generate("the capital of france is", chat=False, **settings)
        streamed = "".join(sdk.generate("the capital of france is", chat=False, stream=True, **settings))
    with gateway(loopback.url, tmp_path, seed=3) as (_, oa, _client):
        ask = dict(model="m", prompt="the capital of france is", max_tokens=6, temperature=0, seed=1)
        completion = oa.completions.create(**ask)
        chunks = list(oa.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        echo = error_of(lambda: oa.completions.create(**{**ask, "echo": True}))
        two = error_of(lambda: oa.completions.create(**{**ask, "prompt": ["a", "b"]}))
    assert completion.object == "text_completion" and completion.choices[0].text == single.text
    assert completion.veil["private_tokens"] == single.privacy.private_tokens == 5  # no template: all of it
    assert "".join(c.choices[0].text for c in chunks if c.choices) == streamed
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert (echo.body["param"], two.body["param"]) == ("echo", "prompt")
