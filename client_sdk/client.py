"""`PrivateLLMClient` and `AsyncPrivateLLMClient`: privatize on the device, generate on the server.

Both share `_ClientCore`, which does everything but I/O: tokenizing, privatizing, accounting and
charging the budget before any byte leaves, and reading the server's answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Generator, Iterator

import httpx

from client_sdk.accounting import DEFAULT_DELTA, PrivacyReport, privacy_report
from client_sdk.budget import BudgetLedger
from client_sdk.bundle import DEFAULT_CACHE_DIR, ClientBundle, files_to_fetch, sha256_hex, store_verified
from client_sdk.errors import ServerError
from client_sdk.mechanism import MechanismParams, secure_rng
from client_sdk.privatize import privatize_tokens
from client_sdk.schemas import BundleInfo, GenerateResponse


class GenerationResult(GenerateResponse):
    """A generation (the server's answer) and what it cost: the privacy spent and the bytes sent."""

    privacy: PrivacyReport
    bytes_sent: int


@dataclass(frozen=True)
class PreparedPrompt:
    """A privatized prompt ready to send, with its privacy cost."""

    payload: bytes
    params: MechanismParams
    report: PrivacyReport

    @property
    def charge_id(self) -> str:
        return sha256_hex(self.payload)


class _SSEParser:
    """Server-Sent Events, one line at a time: yields (event, data) when an event ends."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            if not self.data:
                return None
            done = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return done
        field_name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field_name == "event":
            self.event = value
        elif field_name == "data":
            self.data.append(value)
        return None


class _ClientCore:
    def __init__(
        self,
        *,
        api_key: str | None,
        mu: float | None,
        bits: int | None,
        projection_id: str | None,
        delta: float,
        ledger: BudgetLedger | str | Path | None,
        budget_key: str,
        cache_dir: str | Path | None,
        seed: int | None,
    ) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.mu, self.bits, self.projection_id, self.delta = mu, bits, projection_id, delta
        self.ledger = BudgetLedger(ledger) if isinstance(ledger, (str, Path)) else ledger
        self.budget_key = budget_key
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR / "files"
        self._rng = secure_rng(seed) if seed is not None else None  # None: fresh OS seed per call

    def fetch_bundle(self) -> Generator[str, httpx.Response, ClientBundle]:
        """Sans-I/O: yields each URL to GET, is sent its response, returns the verified bundle."""
        response = yield "/v1/bundle"
        self.check(response)
        info = BundleInfo.model_validate(response.json())
        for url, sha, what in files_to_fetch(info, self.cache_dir):
            response = yield url
            self.check(response)
            store_verified(self.cache_dir, response.content, sha, what)
        return ClientBundle.from_cache(info, self.cache_dir)

    def prepare(self, bundle: ClientBundle, prompt: str, chat: bool) -> PreparedPrompt:
        params = bundle.mechanism(mu=self.mu, bits=self.bits, projection_id=self.projection_id)
        projection = bundle.projection(self.projection_id)
        token_ids = bundle.tokenize(prompt, chat=chat)
        payload = privatize_tokens(token_ids, bundle.tables[projection.id], params, projection.id, self._rng)
        return PreparedPrompt(payload=payload, params=params, report=privacy_report(params, len(token_ids), self.delta))

    def charge(self, prepared: PreparedPrompt) -> None:
        """Reserve the prompt's epsilon in the ledger; raises BudgetExceededError before anything is sent."""
        if self.ledger is not None:
            self.ledger.reserve(self.budget_key, prepared.charge_id, prepared.report.epsilon, prepared.report.delta)

    def settle(self, prepared: PreparedPrompt, sent: bool) -> None:
        if self.ledger is None:
            return
        if sent:
            self.ledger.mark_sent(prepared.charge_id)
        else:
            self.ledger.release(prepared.charge_id)

    def charged_request(self, http: httpx.Client | httpx.AsyncClient, prepared: PreparedPrompt, *,
                        max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                        stop: list[str] | None, stream: bool) -> httpx.Request:
        """Charge the budget (raising before anything is sent), then build the /v1/generate request."""
        self.charge(prepared)
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
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error") or response.text
        except (ValueError, AttributeError):
            detail = response.text
        raise ServerError(response.status_code, str(detail))

    @staticmethod
    def result(body: dict, prepared: PreparedPrompt) -> GenerationResult:
        answer = GenerateResponse.model_validate(body)
        return GenerationResult(**answer.model_dump(), privacy=prepared.report, bytes_sent=len(prepared.payload))

    @staticmethod
    def stream_event(event: str, data: str) -> tuple[str | None, dict | None]:
        """(text chunk, final body) of one SSE event; raises ServerError on an error event."""
        body = json.loads(data)
        if event == "error":
            raise ServerError(200, body.get("detail", data))
        if event == "done":
            return None, body
        return body.get("text", ""), None


class GenerationStream:
    """Iterate to get text chunks as the server generates them; `result` is set once it ends."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._chunks


class AsyncGenerationStream:
    """Async twin of `GenerationStream`."""

    def __init__(self, chunks: AsyncIterator[str]) -> None:
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks


_COMMON_DOC = """
    base_url: the server, e.g. "http://127.0.0.1:8000".
    mu, bits, projection_id: mechanism settings (per-token CLT mu); default: the bundle's defaults.
    delta: the delta at which epsilon is reported and charged.
    ledger: a BudgetLedger (or a path to one); sends that would exceed its limits are refused.
    seed: only for tests; by default every call draws a fresh seed from the OS's secure source.
"""


class PrivateLLMClient:
    __doc__ = "Synchronous client." + _COMMON_DOC

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        mu: float | None = None,
        bits: int | None = None,
        projection_id: str | None = None,
        delta: float = DEFAULT_DELTA,
        ledger: BudgetLedger | str | Path | None = None,
        budget_key: str = "default",
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _ClientCore(api_key=api_key, mu=mu, bits=bits, projection_id=projection_id, delta=delta,
                                 ledger=ledger, budget_key=budget_key, cache_dir=cache_dir, seed=seed)
        self._http = httpx.Client(base_url=base_url, headers=self._core.headers, timeout=timeout, transport=transport)
        self._bundle: ClientBundle | None = None

    @property
    def bundle(self) -> ClientBundle:
        """The server's bundle, fetched on first use; files are cached by hash and verified."""
        if self._bundle is None:
            steps = self._core.fetch_bundle()
            url = next(steps)
            while self._bundle is None:
                try:
                    url = steps.send(self._http.get(url))
                except StopIteration as done:
                    self._bundle = done.value
        return self._bundle

    def prepare(self, prompt: str, *, chat: bool = True) -> PreparedPrompt:
        """Privatize a prompt without sending it (to inspect its cost)."""
        return self._core.prepare(self.bundle, prompt, chat)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        chat: bool = True,
    ) -> GenerationResult | GenerationStream:
        """Privatize `prompt`, charge its epsilon, send it and return the answer (or a stream of it)."""
        prepared = self.prepare(prompt, chat=chat)
        request = self._core.charged_request(self._http, prepared, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                             stream=stream)
        try:
            response = self._http.send(request, stream=stream)
        except httpx.ConnectError:
            self._core.settle(prepared, sent=False)
            raise
        self._core.settle(prepared, sent=True)
        if not stream:
            self._core.check(response)
            return self._core.result(response.json(), prepared)
        if not response.is_success:
            response.read()
            response.close()
            self._core.check(response)
        out = GenerationStream(iter(()))

        def chunks() -> Iterator[str]:
            parser = _SSEParser()
            try:
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    text, final = self._core.stream_event(*event)
                    if final is not None:
                        out.result = self._core.result(final, prepared)
                    elif text:
                        yield text
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
        mu: float | None = None,
        bits: int | None = None,
        projection_id: str | None = None,
        delta: float = DEFAULT_DELTA,
        ledger: BudgetLedger | str | Path | None = None,
        budget_key: str = "default",
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _ClientCore(api_key=api_key, mu=mu, bits=bits, projection_id=projection_id, delta=delta,
                                 ledger=ledger, budget_key=budget_key, cache_dir=cache_dir, seed=seed)
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._core.headers, timeout=timeout,
                                       transport=transport)
        self._bundle: ClientBundle | None = None

    async def get_bundle(self) -> ClientBundle:
        """The server's bundle, fetched on first use; files are cached by hash and verified."""
        if self._bundle is None:
            steps = self._core.fetch_bundle()
            url = next(steps)
            while self._bundle is None:
                try:
                    url = steps.send(await self._http.get(url))
                except StopIteration as done:
                    self._bundle = done.value
        return self._bundle

    async def prepare(self, prompt: str, *, chat: bool = True) -> PreparedPrompt:
        """Privatize a prompt without sending it (to inspect its cost)."""
        return self._core.prepare(await self.get_bundle(), prompt, chat)

    async def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        chat: bool = True,
    ) -> GenerationResult | AsyncGenerationStream:
        """Privatize `prompt`, charge its epsilon, send it and return the answer (or a stream of it)."""
        prepared = await self.prepare(prompt, chat=chat)
        request = self._core.charged_request(self._http, prepared, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                             stream=stream)
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.ConnectError:
            self._core.settle(prepared, sent=False)
            raise
        self._core.settle(prepared, sent=True)
        if not stream:
            self._core.check(response)
            return self._core.result(response.json(), prepared)
        if not response.is_success:
            await response.aread()
            await response.aclose()
            self._core.check(response)
        out = AsyncGenerationStream(None)  # type: ignore[arg-type]

        async def chunks() -> AsyncIterator[str]:
            parser = _SSEParser()
            try:
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    text, final = self._core.stream_event(*event)
                    if final is not None:
                        out.result = self._core.result(final, prepared)
                    elif text:
                        yield text
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
