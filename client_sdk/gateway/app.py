"""The gateway's HTTP app: OpenAI's Chat Completions API in front of the SDK's `AsyncPrivateLLMClient`.

Each request's messages become SDK messages under the gateway's mode (modes.py), and the SDK does the rest, as for
any app: the policy's mechanism, the ledger's charge before any byte leaves, spans, placeholders and their
restoration, also across streamed chunks. The gateway adds OpenAI's format, budget keys per caller, stop strings
applied on the device (stop.py) and a local page of the last requests (page.py).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from client_sdk.accounting import PrivacyReport
from client_sdk.client import AsyncGenerationStream, AsyncPrivateLLMClient, GenerationResult
from client_sdk.errors import BudgetExceededError, BundleError, LedgerError, PolicyError, ServerError
from client_sdk.gateway import openai_api
from client_sdk.gateway.modes import Conversations, Mode, to_messages
from client_sdk.gateway.openai_api import ChatCompletionRequest, CompletionRequest, GatewayError, GenerationRequest
from client_sdk.gateway.page import render_page
from client_sdk.gateway.stop import StopScanner
from client_sdk.spans import Conversation, Message

DEFAULT_BUDGET_KEY = "gateway"
NO_RETRY = {"x-should-retry": "false"}  # OpenAI's clients retry 429 and 5xx unless told not to


@dataclass(frozen=True)
class GatewayConfig:
    """mode: what is private (modes.py). keys: the gateway's API keys, secret -> ledger budget key; with none,
    callers are not authenticated and the `user` field picks the budget key (serve on loopback only).
    default_max_tokens: when a request gives no max_tokens. history: requests kept for the page."""

    mode: Mode = "whole"
    keys: Mapping[str, str] = field(default_factory=dict)
    default_max_tokens: int = 256
    history: int = 50
    max_body_bytes: int = 1 << 20


@dataclass
class Exchange:
    """One request as the local page shows it."""

    time: float
    budget_key: str
    stream: bool
    messages: list[tuple[str, list[tuple[str, str, str]]]]  # role, [(treatment, text, placeholder)]
    status: str = "sending"
    answer: str = ""
    privacy: PrivacyReport | None = None


def _display(messages: list[Message], conversation: Conversation) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Each message's parts as the conversation treats them, with the placeholder that replaces each replaced one
    (the SDK asks the same conversation: the same parts, the same placeholders)."""
    return [(m.role, [(p.treatment, p.text, conversation.public_text(p) if p.treatment == "placeholder" else "")
                      for p in parts]) for m, parts in zip(messages, conversation.parts(messages))]


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def gateway_error(err: Exception) -> GatewayError:
    """The OpenAI-shaped error for what the SDK raised; anything else is re-raised (a bug, not an answer)."""
    if isinstance(err, BudgetExceededError):
        return GatewayError(429, str(err), type="insufficient_quota", code="budget_exceeded", headers=NO_RETRY)
    if isinstance(err, PolicyError):
        return GatewayError(403, str(err), type="permission_error", code="policy_refusal", headers=NO_RETRY)
    if isinstance(err, LedgerError):
        return GatewayError(503, str(err), type="api_error", code="ledger_unavailable", headers=NO_RETRY)
    if isinstance(err, BundleError):
        return GatewayError(502, str(err), type="api_error", code="server_bundle_invalid")
    if isinstance(err, ValueError):  # the prompt itself: empty, or longer than the server takes
        return GatewayError(400, str(err), code="invalid_prompt", param="messages")
    if isinstance(err, httpx.TimeoutException):
        return GatewayError(504, f"the veil server did not answer in time ({type(err).__name__})", type="api_error",
                            code="server_timeout")
    if isinstance(err, httpx.TransportError):
        return GatewayError(502, f"the veil server is unreachable ({type(err).__name__}: {err})", type="api_error",
                            code="server_unreachable")
    if isinstance(err, ServerError):
        retry = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after is not None else {}
        detail = f"the veil server refused: {err.detail}"
        if err.status_code == 503 and err.kind == "overloaded":
            return GatewayError(503, detail, type="api_error", code="server_overloaded", headers=retry)
        if err.status_code == 429:
            return GatewayError(429, detail, type="requests", code="server_rate_limited", headers=retry)
        if err.status_code in (401, 403):
            return GatewayError(502, f"{detail} (check the gateway's --server-api-key)", type="api_error",
                                code="server_auth_failed", headers=NO_RETRY)
        if err.status_code in (400, 413, 415, 422):
            return GatewayError(400, detail, code="server_rejected_request", headers=NO_RETRY)
        return GatewayError(502 if err.status_code < 500 else err.status_code, detail, type="api_error",
                            code=err.kind or "server_error", headers=retry)
    raise err


def veil_report(privacy: PrivacyReport, mode: Mode, budget_key: str, placeholders: int) -> dict:
    """The privacy a request spent (the `veil` body field; the x-veil-* headers carry the same)."""
    return {"mode": mode, "budget_key": budget_key, "epsilon": privacy.epsilon,
            "epsilon_per_token": privacy.epsilon_per_token, "delta": privacy.delta,
            "private_tokens": privacy.private_tokens, "public_tokens": privacy.public_tokens,
            "placeholders": placeholders, "mu": privacy.mu_clt, "bits": privacy.bits}


def veil_headers(report: dict) -> dict[str, str]:
    """The report as x-veil-* headers (values percent-encoded: a budget key from `user` may be any text)."""
    return {f"x-veil-{name.replace('_', '-')}": quote(str(value), safe=" :+-.,") for name, value in report.items()}


def create_gateway(client: AsyncPrivateLLMClient, config: GatewayConfig = GatewayConfig()) -> FastAPI:
    """The gateway app for `client` (its server, policy, ledger and seed)."""
    app = FastAPI(title="veil gateway", docs_url=None, redoc_url=None, openapi_url=None)
    exchanges: deque[Exchange] = deque(maxlen=config.history)
    conversations = Conversations()

    @app.exception_handler(GatewayError)
    async def openai_error(_: Request, err: GatewayError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:  # a bug: still answered in OpenAI's shape
        return await openai_error(request, GatewayError(500, f"the gateway failed ({type(err).__name__}); see its log",
                                                        type="api_error", code="internal_error"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else "http_error"
        return await openai_error(request, GatewayError(err.status_code, str(err.detail), code=code))

    def budget_key(request: Request, user: str | None = None) -> str:
        """The caller's ledger budget key: its gateway key's, or (without keys) `user`'s."""
        if not config.keys:
            return f"user:{user}" if user else DEFAULT_BUDGET_KEY
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        for known, key in config.keys.items():
            if scheme.lower() == "bearer" and hmac.compare_digest(secret.encode(), known.encode()):
                return key
        raise GatewayError(401, "a gateway API key is required (Authorization: Bearer ...)", code="invalid_api_key",
                           headers=NO_RETRY)

    async def model_id() -> str:
        try:
            return (await client.get_bundle()).info.model_id
        except Exception as err:
            raise gateway_error(err) from None

    async def read_json(request: Request) -> object:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > config.max_body_bytes:
                raise GatewayError(413, f"the body is over {config.max_body_bytes} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise GatewayError(400, "the body is not valid JSON", code="invalid_json") from None

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> HTMLResponse:
        if not is_loopback(request.client.host if request.client else None):
            raise GatewayError(403, "the gateway's page shows private text: only this machine may read it",
                               type="permission_error", code="page_loopback_only")
        keys = sorted({e.budget_key for e in exchanges} | set(config.keys.values()))
        budgets = await asyncio.to_thread(_budgets, client, keys)
        return HTMLResponse(render_page(list(reversed(exchanges)), budgets, config.mode, bool(config.keys),
                                        client.ledger is not None))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        budget_key(request)
        return {"object": "list", "data": [{"id": await model_id(), "object": "model", "created": 0,
                                            "owned_by": "veil"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatCompletionRequest, openai_api.CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, openai_api.TEXT)

    async def complete(request: Request, kind: type[GenerationRequest],
                       form: openai_api.ResponseFormat) -> Response:
        budget_key(request)  # authenticate before reading the body
        req = openai_api.parse_request(await read_json(request), kind)
        key = budget_key(request, req.user)
        pairs = req.conversation()
        messages = to_messages(pairs, config.mode)
        conversation = conversations.get(key, pairs)
        exchange = Exchange(time.time(), key, req.stream, _display(messages, conversation))
        exchanges.append(exchange)
        max_new_tokens = req.max_new_tokens or config.default_max_tokens
        try:
            upstream = await client.generate(messages, max_new_tokens=max_new_tokens, temperature=req.temperature,
                                             top_p=req.top_p, seed=req.seed, stream=req.stream or bool(req.stop),
                                             chat=form.chat, budget_key=key, conversation=conversation)
        except Exception as err:
            failure = gateway_error(err)
            exchange.status = failure.code
            raise failure from None
        exchange.privacy = upstream.privacy
        placeholders = len({name for _, parts in exchange.messages for _, _, name in parts if name})
        report = veil_report(upstream.privacy, config.mode, key, placeholders)
        headers = veil_headers(report)
        model = await model_id()
        if isinstance(upstream, GenerationResult):
            exchange.answer, exchange.status = upstream.text, "ok"
            finish = "length" if upstream.completion_tokens >= max_new_tokens else "stop"
            return JSONResponse(form.completion(
                form.completion_id(), model, upstream.text, finish,
                openai_api.usage(upstream.prompt_tokens, upstream.completion_tokens), report), headers=headers)
        answer = Answer(client, upstream, req.stop, max_new_tokens)
        if not req.stream:
            try:
                text = "".join([piece async for piece in answer])
            except Exception as err:
                failure = gateway_error(err)
                exchange.status = failure.code
                raise failure from None
            exchange.answer, exchange.status = text, "ok"
            return JSONResponse(form.completion(form.completion_id(), model, text, answer.finish,
                                                await answer.usage(), report), headers=headers)
        events = stream_events(answer, exchange, model, report, req.include_usage, form)
        return EventSourceResponse(events, headers=headers, ping=15)

    async def stream_events(answer: "Answer", exchange: Exchange, model: str, report: dict, include_usage: bool,
                            form: openai_api.ResponseFormat) -> AsyncIterator[str]:
        id = form.completion_id()
        if start := form.start_chunk(id, model):
            yield json.dumps(start)
        exchange.status = "client went away"  # unless the stream ends below
        try:
            async for piece in answer:
                exchange.answer += piece
                yield json.dumps(form.chunk(id, model, piece))
        except Exception as err:  # the status line is sent: the error goes in-band, as OpenAI's streams do
            failure = gateway_error(err)
            exchange.status = failure.code
            yield json.dumps(failure.body())
            return
        exchange.status = "ok"
        yield json.dumps(form.chunk(id, model, None, answer.finish, veil=report))
        if include_usage:
            yield json.dumps(form.usage_chunk(id, model, await answer.usage(), veil=report))
        yield "[DONE]"

    return app


class Answer:
    """The restored text of a streamed answer, cut on the device at the first stop string; async-iterate it once,
    then read `finish` and `usage()`."""

    def __init__(self, client: AsyncPrivateLLMClient, stream: AsyncGenerationStream, stops: list[str],
                 max_new_tokens: int) -> None:
        self._client, self._stream, self._max_new_tokens = client, stream, max_new_tokens
        self._scanner = StopScanner(stops)
        self._text = ""

    async def __aiter__(self) -> AsyncIterator[str]:
        chunks = aiter(self._stream)
        try:
            async for chunk in chunks:
                if piece := self._scanner.feed(chunk):
                    self._text += piece
                    yield piece
                if self._scanner.stopped:
                    return  # closing the stream below stops the server's generation
            if tail := self._scanner.flush():
                self._text += tail
                yield tail
        finally:
            await chunks.aclose()

    @property
    def finish(self) -> str:
        result = self._stream.result
        if self._scanner.stopped or result is None:
            return "stop"
        return "length" if result.completion_tokens >= self._max_new_tokens else "stop"

    async def usage(self) -> dict:
        """The server's token counts; cut by a stop string, the completion is counted on the device."""
        result, privacy = self._stream.result, self._stream.privacy
        if result is not None and not self._scanner.stopped:
            return openai_api.usage(result.prompt_tokens, result.completion_tokens)
        tokenizer = (await self._client.get_bundle()).tokenizer
        completion = len(tokenizer.encode(self._text, add_special_tokens=False).ids)
        return openai_api.usage(privacy.private_tokens + privacy.public_tokens, completion)


def _budgets(client: AsyncPrivateLLMClient, keys: list[str]) -> list[dict]:
    """Each key's composed spending and what is left of its cap (the ledger's own numbers)."""
    ledger = client.ledger
    if ledger is None:
        return []
    out = []
    for key in keys:
        spent, limits = ledger.spent(key), ledger.limits(key)
        left = None if limits.total_epsilon is None else max(0.0, limits.total_epsilon - spent.epsilon)
        out.append({"key": key, "spent": spent.epsilon, "charges": spent.charges, "tokens": spent.private_tokens,
                    "total": limits.total_epsilon, "left": left})
    return out
