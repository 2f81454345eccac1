"""What the server sends, read within a size cap: refused from its Content-Length before its body is read, else as
soon as the body (decoded, as httpx gives it) runs past the cap. So no answer can exhaust the device's memory."""

from __future__ import annotations

from typing import AsyncIterator, Iterator

import httpx

from client_sdk.errors import VeilError


class _Cap:
    def __init__(self, limit: int, what: str, error: type[VeilError]) -> None:
        self.limit, self.what, self.error = limit, what, error
        self.size = 0

    def refuse(self, how: str) -> None:
        raise self.error(f"{self.what}: the server's answer {how}, over the limit of {self.limit} bytes; refusing")

    def declared(self, response: httpx.Response) -> None:
        length = response.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limit:
            self.refuse(f"declares {length} bytes")

    def count(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size > self.limit:
            self.refuse("runs past it")
        return chunk


class _Chunks(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes], cap: _Cap) -> None:
        self.chunks, self.cap = chunks, cap

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            yield self.cap.count(chunk)


class _AsyncChunks(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes], cap: _Cap) -> None:
        self.chunks, self.cap = chunks, cap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield self.cap.count(chunk)


DECODED = ("content-length", "content-encoding", "transfer-encoding")
"""Headers that describe the body as sent, not as decoded: left out of the capped response."""


def _body_of(response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in DECODED]
    return httpx.Response(response.status_code, headers=headers, stream=stream, request=response.request)


def capped(response: httpx.Response, limit: int, what: str, error: type[VeilError]) -> httpx.Response:
    """`response` (sent with stream=True, not yet read) as a response whose body raises `error` past `limit` bytes;
    the caller still closes `response`."""
    cap = _Cap(limit, what, error)
    cap.declared(response)
    return _body_of(response, _Chunks(response.iter_bytes(), cap))


def acapped(response: httpx.Response, limit: int, what: str, error: type[VeilError]) -> httpx.Response:
    """Async twin of `capped`."""
    cap = _Cap(limit, what, error)
    cap.declared(response)
    return _body_of(response, _AsyncChunks(response.aiter_bytes(), cap))


def get_capped(http: httpx.Client, url: httpx.URL | str, limit: int, what: str,
               error: type[VeilError]) -> httpx.Response:
    """GET `url`, its body read within `limit` bytes (`error` past it)."""
    response = http.send(http.build_request("GET", url), stream=True)
    try:
        body = capped(response, limit, what, error)
        body.read()
        return body
    finally:
        response.close()


async def aget_capped(http: httpx.AsyncClient, url: httpx.URL | str, limit: int, what: str,
                      error: type[VeilError]) -> httpx.Response:
    """Async twin of `get_capped`."""
    response = await http.send(http.build_request("GET", url), stream=True)
    try:
        body = acapped(response, limit, what, error)
        await body.aread()
        return body
    finally:
        await response.aclose()
