"""Reading request bodies: bounded in size before they are held in memory, and in the time they may take to arrive."""

import asyncio

from fastapi import Request
from starlette.exceptions import HTTPException


def media_type(request: Request) -> str:
    """The request's media type, lower-cased and without parameters ("" when there is none): media types are
    case-insensitive (RFC 9110, 8.3.1)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408 when it has
    not all arrived within `timeout` seconds (default: the app's `body_timeout_s` setting): a client that trickles
    a body in must not hold a connection and a buffer open for long."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"payload of {declared} bytes exceeds the limit of {limit} bytes")
    if timeout is None:
        timeout = request.app.state.settings.body_timeout_s
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"payload exceeds the limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)
