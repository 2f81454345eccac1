"""`PrivateLLMClient` and `AsyncPrivateLLMClient`: privatize on the device, generate on the server.

Both share `_ClientCore`, which does everything but I/O: choosing the mechanism under the device's
policy, splitting the prompt into public and private spans, privatizing, accounting and charging the
ledger before any byte leaves, and reading the server's answers (restoring placeholders).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Generator, Iterator, Literal, Mapping, Sequence

import httpx
import platformdirs
from httpx_sse import EventSource, SSEError
from pydantic import ValidationError

from client_sdk import wire
from client_sdk.accounting import PrivacyReport, privacy_report
from client_sdk.budget import BudgetLedger, Mechanism
from client_sdk.bundle import (DEFAULT_CACHE_DIR, MAX_BUNDLE_INFO_BYTES, ClientBundle, files_to_fetch, parse_bundle_info,
                               sha256_hex, store_verified)
from client_sdk.capped import acapped, aget_capped, capped, get_capped
from client_sdk.errors import BudgetExceededError, BundleError, ProtocolError, ServerError
from client_sdk.mechanism import MechanismParams, secure_rng
from client_sdk.policy import PrivacyPolicy, check_private
from client_sdk.privatize import privatize_spans
from client_sdk.schemas import GenerateResponse
from client_sdk.spans import Conversation, Message, as_messages

Prompt = str | Sequence[Message | Mapping]
SENT = "the prompt was sent and its privacy charged"
MAX_ANSWER_BYTES = 16 << 20
"""A generation's answer (JSON, or the whole event stream)."""
ANSWER = f"the answer ({SENT})"
Private = Literal["message", "detect"]


def default_ledger_path() -> Path:
    """The ledger every client uses unless told otherwise: ledger.db in the user's data directory."""
    return Path(platformdirs.user_data_dir("veil", appauthor=False)) / "ledger.db"


class GenerationResult(GenerateResponse):
    """A generation (the server's answer, placeholders restored) and what it cost: privacy spent, bytes sent."""

    privacy: PrivacyReport
    bytes_sent: int


@dataclass(frozen=True)
class PreparedPrompt:
    """A privatized prompt ready to send, with its privacy cost and the conversation whose placeholders the answer
    is restored from."""

    payload: bytes
    params: MechanismParams
    report: PrivacyReport
    conversation: Conversation = field(repr=False)

    @property
    def charge_id(self) -> str:
        return sha256_hex(self.payload)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.report.private_tokens, self.params.levels * self.params.dim, self.params.worst_case_p)


class _ClientCore:
    def __init__(
        self,
        *,
        api_key: str | None,
        policy: PrivacyPolicy | None,
        mu: float | None,
        bits: int | None,
        projection_id: str | None,
        allow_looser_bundle: bool,
        ledger: BudgetLedger | str | Path | Literal[False] | None,
        budget_key: str,
        cache_dir: str | Path | None,
        seed: int | None,
        chat_templates: Sequence[str],
    ) -> None:
        self.chat_templates = tuple(chat_templates)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.policy = policy or PrivacyPolicy.default()
        self.mu, self.bits, self.projection_id = mu, bits, projection_id
        self.allow_looser_bundle = allow_looser_bundle
        if ledger is None:
            ledger = default_ledger_path()
        self.ledger = BudgetLedger(ledger) if isinstance(ledger, (str, Path)) else (ledger or None)
        self.budget_key = budget_key
        self._limited_keys: set[str] = set()
        self.limit(budget_key)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR / "files"
        self._rng = secure_rng(seed) if seed is not None else None  # None: fresh OS seed per call

    def limit(self, budget_key: str) -> None:
        """Make the policy's caps the ledger's limits for `budget_key` (once per key and client)."""
        if self.ledger is not None and budget_key not in self._limited_keys:
            self.ledger.set_limits(budget_key, per_prompt_epsilon=self.policy.epsilon_per_prompt,
                                   total_epsilon=self.policy.epsilon_total, delta=self.policy.delta)
            self._limited_keys.add(budget_key)

    def fetch_bundle(self, base_url: httpx.URL) -> Generator[tuple[httpx.URL | str, int, str], httpx.Response,
                                                              ClientBundle]:
        """Sans-I/O: yields each (URL, size limit, description) to GET, is sent its response (the body read up to
        the limit), returns the verified bundle."""
        response = yield "/v1/bundle", MAX_BUNDLE_INFO_BYTES, "the bundle"
        self.check(response)
        info = parse_bundle_info(response.content)
        if info.wire_version < wire.VERSION:
            raise BundleError(f"the server speaks wire version {info.wire_version}; this client needs "
                              f"{wire.VERSION} (public and private spans): upgrade the server")
        for url, sha, what, limit in files_to_fetch(info, base_url, self.cache_dir):
            response = yield url, limit, what
            self.check(response)
            store_verified(self.cache_dir, response.content, sha, what)
        return ClientBundle.from_cache(info, self.cache_dir, self.chat_templates)

    def prepare(self, bundle: ClientBundle, prompt: Prompt, chat: bool, conversation: Conversation | None,
                private: Private | None) -> PreparedPrompt:
        params = bundle.mechanism(self.policy, mu=self.mu, bits=self.bits, projection_id=self.projection_id,
                                  allow_looser_bundle=self.allow_looser_bundle)
        projection = bundle.projection(self.projection_id)
        conversation = conversation if conversation is not None else Conversation()
        messages = as_messages(prompt)
        private = private or self.policy.private
        check_private(private)
        if private == "detect":
            from client_sdk.detect import detect_messages

            messages = detect_messages(messages, self.policy.treatments)
        spans = bundle.spans(messages, chat=chat, conversation=conversation)
        payload = privatize_spans(spans, bundle.tables[projection.id], params, projection.id, self._rng)
        report = privacy_report(params, payload.private_tokens, self.policy.delta, public_tokens=payload.public_tokens)
        return PreparedPrompt(wire.encode(payload), params, report, conversation)

    def charge(self, prepared: PreparedPrompt, budget_key: str | None = None) -> None:
        """Check the policy's per-prompt cap and reserve the prompt's epsilon in the ledger under `budget_key`
        (default: the client's); raises BudgetExceededError before anything is sent. A prompt without private
        tokens costs nothing."""
        report, cap = prepared.report, self.policy.epsilon_per_prompt
        if cap is not None and report.epsilon > cap:
            raise BudgetExceededError(f"this prompt costs epsilon={report.epsilon:.4g} ({report.private_tokens} "
                                      f"private tokens), over the policy's per-prompt cap {cap:.4g}; nothing was sent")
        key = budget_key or self.budget_key
        self.limit(key)
        if self.ledger is not None and report.private_tokens:
            self.ledger.reserve(key, prepared.charge_id, report.epsilon, report.delta, prepared.mechanism)

    def settle(self, prepared: PreparedPrompt, sent: bool) -> None:
        if self.ledger is None or not prepared.report.private_tokens:
            return
        if sent:
            self.ledger.mark_sent(prepared.charge_id)
        else:
            self.ledger.release(prepared.charge_id)

    def charged_request(self, http: httpx.Client | httpx.AsyncClient, prepared: PreparedPrompt, *,
                        max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                        stop: list[str] | None, stream: bool, budget_key: str | None) -> httpx.Request:
        """Charge the budget (raising before anything is sent), then build the /v1/generate request."""
        self.charge(prepared, budget_key)
        params: dict = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                        "stream": str(stream).lower()}
        if seed is not None:
            params["seed"] = seed
        if stop:
            params["stop"] = stop
        return http.build_request("POST", "/v1/generate", params=params, content=prepared.payload,
                                  headers={"Content-Type": "application/octet-stream"})

    @staticmethod
    def check(response: httpx.Response) -> None:
        if response.is_success:
            return
        kind = None
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error") or response.text
            kind = body.get("error") if isinstance(body.get("error"), str) else None
        except (ValueError, AttributeError):
            detail = response.text
        try:
            retry_after = float(response.headers["Retry-After"])
        except (KeyError, ValueError):
            retry_after = None
        raise ServerError(response.status_code, str(detail), kind, retry_after)

    @staticmethod
    def result(body: str | bytes, prepared: PreparedPrompt) -> GenerationResult:
        """The answer in a JSON `body` (a response's, or a stream's final event), placeholders restored."""
        try:
            answer = GenerateResponse.model_validate_json(body)
        except ValidationError as err:
            raise ProtocolError(f"the server's answer is not a valid generation ({err.error_count()} problems, first: "
                                f"{err.errors()[0]['msg']}); {SENT}") from None
        answer.text = prepared.conversation.restore(answer.text)
        return GenerationResult(**answer.model_dump(), privacy=prepared.report, bytes_sent=len(prepared.payload))

    @staticmethod
    def stream_event(event: str, data: str) -> tuple[str | None, str | None]:
        """(text chunk, final body) of one SSE event; raises ServerError on an error event, ProtocolError on one
        that is not the API's."""
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("text", ""), str):
            raise ProtocolError(f"the server's event stream sent {event!r} data that is not the API's JSON object: "
                                f"{data[:80]!r}; {SENT}")
        if event == "error":
            kind = body.get("error") if isinstance(body.get("error"), str) else None
            raise ServerError(200, str(body.get("detail", data)), kind)
        if event == "done":
            return None, data
        return body.get("text", ""), None

    @staticmethod
    def stream_ended(stream: "GenerationStream | AsyncGenerationStream") -> None:
        if stream.result is None:
            raise ProtocolError(f"the server's event stream ended without its final event; {SENT}")


class GenerationStream:
    """Iterate to get text chunks as the server generates them (placeholders restored, also when one is split
    across chunks); `result` is set once it ends."""

    def __init__(self, chunks: Iterator[str], privacy: PrivacyReport, bytes_sent: int) -> None:
        self._chunks = chunks
        self.privacy, self.bytes_sent = privacy, bytes_sent  # known before the first chunk
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._chunks


class AsyncGenerationStream:
    """Async twin of `GenerationStream`."""

    def __init__(self, chunks: AsyncIterator[str] | None, privacy: PrivacyReport, bytes_sent: int) -> None:
        self._chunks = chunks
        self.privacy, self.bytes_sent = privacy, bytes_sent  # known before the first chunk
        self.result: GenerationResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks


_COMMON_DOC = """
    base_url: the server, e.g. "http://127.0.0.1:8000".
    policy: the device's PrivacyPolicy (default: PrivacyPolicy.default()); mu is derived from it.
    mu, bits, projection_id: explicit settings (they must fit the policy); by default the bundle's
        suggestion if it fits the policy, else PolicyError.
    allow_looser_bundle: when the server suggests looser settings than the policy, use the policy's own mu
        instead of raising PolicyError.
    ledger: a BudgetLedger or a path; None (default) is the persistent ledger in the user's data directory
        (`default_ledger_path()`); False turns the ledger off. The policy's caps are its limits for budget_key.
    seed: only for tests; by default every call draws a fresh seed from the OS's secure source.
    chat_templates: chat templates the app has vetted, rendered when the server's bundle names one of them (by
        SHA-256) besides those the SDK ships (client_sdk.templates); the server's own text is never rendered.
    A prompt is a string (one user message, private throughout) or a list of messages
    ({"role", "content", "public"?} dicts or Message), whose content may be parts (client_sdk.spans).
    conversation (per call): a client_sdk.Conversation kept across the calls of one conversation, so that every
        value marked in it is replaced or noised wherever it appears again, also in public or assistant turns,
        and answers are restored only from the placeholders it issued; default: a fresh one per call.
    private (per call): "detect" makes only what the on-device detector finds private in each message given as a
        string (client_sdk.detect; the policy's `treatments` say placeholder or noise per label), the rest public;
        "message" keeps the whole message private; default: the policy's `private` ("message").
"""


class PrivateLLMClient:
    __doc__ = "Synchronous client." + _COMMON_DOC

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        policy: PrivacyPolicy | None = None,
        mu: float | None = None,
        bits: int | None = None,
        projection_id: str | None = None,
        allow_looser_bundle: bool = False,
        ledger: BudgetLedger | str | Path | Literal[False] | None = None,
        budget_key: str = "default",
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        chat_templates: Sequence[str] = (),
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _ClientCore(api_key=api_key, policy=policy, mu=mu, bits=bits, projection_id=projection_id,
                                 allow_looser_bundle=allow_looser_bundle, ledger=ledger, budget_key=budget_key,
                                 cache_dir=cache_dir, seed=seed, chat_templates=chat_templates)
        self._http = httpx.Client(base_url=base_url, headers=self._core.headers, timeout=timeout, transport=transport)
        self._bundle: ClientBundle | None = None

    @property
    def ledger(self) -> BudgetLedger | None:
        return self._core.ledger

    @property
    def policy(self) -> PrivacyPolicy:
        return self._core.policy

    @property
    def bundle(self) -> ClientBundle:
        """The server's bundle, fetched on first use; files are cached by hash and verified."""
        if self._bundle is None:
            steps = self._core.fetch_bundle(self._http.base_url)
            request = next(steps)
            while self._bundle is None:
                try:
                    request = steps.send(get_capped(self._http, *request, BundleError))
                except StopIteration as done:
                    self._bundle = done.value
        return self._bundle

    def prepare(self, prompt: Prompt, *, chat: bool = True, conversation: Conversation | None = None,
                private: Private | None = None) -> PreparedPrompt:
        """Privatize a prompt without sending it (to inspect its cost)."""
        return self._core.prepare(self.bundle, prompt, chat, conversation, private)

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        chat: bool = True,
        budget_key: str | None = None,
        conversation: Conversation | None = None,
        private: Private | None = None,
    ) -> GenerationResult | GenerationStream:
        """Privatize `prompt`, charge its epsilon (to `budget_key`, default the client's), send it and return the
        answer (or a stream of it)."""
        prepared = self.prepare(prompt, chat=chat, conversation=conversation, private=private)
        request = self._core.charged_request(self._http, prepared, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                             stream=stream, budget_key=budget_key)
        try:
            response = self._http.send(request, stream=True)
        except httpx.ConnectError:
            self._core.settle(prepared, sent=False)
            raise
        self._core.settle(prepared, sent=True)
        streaming = False
        try:
            answer = capped(response, MAX_ANSWER_BYTES, ANSWER, ProtocolError)
            if not (stream and answer.is_success):
                answer.read()
                self._core.check(answer)
                return self._core.result(answer.content, prepared)
            streaming = True  # the stream closes the response when it ends
        finally:
            if not streaming:
                response.close()
        out = GenerationStream(iter(()), prepared.report, len(prepared.payload))

        def chunks() -> Iterator[str]:
            restorer = prepared.conversation.stream_restorer()
            try:
                for sse in EventSource(answer).iter_sse():
                    text, final = self._core.stream_event(sse.event, sse.data)
                    if final is not None:
                        out.result = self._core.result(final, prepared)
                    elif text and (restored := restorer.feed(text)):
                        yield restored
                self._core.stream_ended(out)
                if tail := restorer.flush():
                    yield tail
            except SSEError as err:
                raise ProtocolError(f"the server's answer is not an event stream ({err}); {SENT}") from None
            finally:
                response.close()

        out._chunks = chunks()
        return out

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "PrivateLLMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPrivateLLMClient:
    __doc__ = "Asynchronous client (httpx.AsyncClient)." + _COMMON_DOC

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        policy: PrivacyPolicy | None = None,
        mu: float | None = None,
        bits: int | None = None,
        projection_id: str | None = None,
        allow_looser_bundle: bool = False,
        ledger: BudgetLedger | str | Path | Literal[False] | None = None,
        budget_key: str = "default",
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        chat_templates: Sequence[str] = (),
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _ClientCore(api_key=api_key, policy=policy, mu=mu, bits=bits, projection_id=projection_id,
                                 allow_looser_bundle=allow_looser_bundle, ledger=ledger, budget_key=budget_key,
                                 cache_dir=cache_dir, seed=seed, chat_templates=chat_templates)
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._core.headers, timeout=timeout,
                                       transport=transport)
        self._bundle: ClientBundle | None = None

    @property
    def ledger(self) -> BudgetLedger | None:
        return self._core.ledger

    @property
    def policy(self) -> PrivacyPolicy:
        return self._core.policy

    async def get_bundle(self) -> ClientBundle:
        """The server's bundle, fetched on first use; files are cached by hash and verified."""
        if self._bundle is None:
            steps = self._core.fetch_bundle(self._http.base_url)
            request = next(steps)
            while self._bundle is None:
                try:
                    request = steps.send(await aget_capped(self._http, *request, BundleError))
                except StopIteration as done:
                    self._bundle = done.value
        return self._bundle

    async def prepare(self, prompt: Prompt, *, chat: bool = True, conversation: Conversation | None = None,
                      private: Private | None = None) -> PreparedPrompt:
        """Privatize a prompt without sending it (to inspect its cost)."""
        return self._core.prepare(await self.get_bundle(), prompt, chat, conversation, private)

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        chat: bool = True,
        budget_key: str | None = None,
        conversation: Conversation | None = None,
        private: Private | None = None,
    ) -> GenerationResult | AsyncGenerationStream:
        """Privatize `prompt`, charge its epsilon (to `budget_key`, default the client's), send it and return the
        answer (or a stream of it)."""
        prepared = await self.prepare(prompt, chat=chat, conversation=conversation, private=private)
        # the ledger's durable writes run in a thread: one caller's fsync must not stall the event loop's others
        request = await asyncio.to_thread(self._core.charged_request, self._http, prepared,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed, stop=stop, stream=stream, budget_key=budget_key)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.ConnectError:
            await asyncio.to_thread(self._core.settle, prepared, False)
            raise
        await asyncio.to_thread(self._core.settle, prepared, True)
        streaming = False
        try:
            answer = acapped(response, MAX_ANSWER_BYTES, ANSWER, ProtocolError)
            if not (stream and answer.is_success):
                await answer.aread()
                self._core.check(answer)
                return self._core.result(answer.content, prepared)
            streaming = True  # the stream closes the response when it ends
        finally:
            if not streaming:
                await response.aclose()
        out = AsyncGenerationStream(None, prepared.report, len(prepared.payload))

        async def chunks() -> AsyncIterator[str]:
            restorer = prepared.conversation.stream_restorer()
            try:
                async for sse in EventSource(answer).aiter_sse():
                    text, final = self._core.stream_event(sse.event, sse.data)
                    if final is not None:
                        out.result = self._core.result(final, prepared)
                    elif text and (restored := restorer.feed(text)):
                        yield restored
                self._core.stream_ended(out)
                if tail := restorer.flush():
                    yield tail
            except SSEError as err:
                raise ProtocolError(f"the server's answer is not an event stream ({err}); {SENT}") from None
            finally:
                await response.aclose()

        out._chunks = chunks()
        return out

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncPrivateLLMClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
